#!/usr/bin/env bash
# The body of slurm/pretrain.sh and slurm/embed.sh (sbatch runs a copy of the batch script from
# its spool folder, so the repository is found through SLURM_SUBMIT_DIR or ANT_HOME).
#   _job.sh MODULE CONFIG [key=value ...]
set -uo pipefail
module=$1; config=$2; shift 2
cd "${ANT_HOME:-${SLURM_SUBMIT_DIR:-.}}" || exit 2
export ANT_PYTHON=${ANT_PYTHON:-$PWD/.venv/bin/python}
export ANT_CONFIG=$config
export ANT_GPUS_PER_NODE=${ANT_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
export MASTER_PORT=${ANT_MASTER_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}  # one port per job
echo "[job $SLURM_JOB_ID] start $(date -Is), restart ${SLURM_RESTART_COUNT:-0}, nodes $SLURM_JOB_NODELIST," \
     "$ANT_GPUS_PER_NODE process(es) per node, main $MASTER_ADDR:$MASTER_PORT, $module ${ANT_CONFIG:+--config $ANT_CONFIG} $*"

srun --kill-on-bad-exit=1 --ntasks-per-node=1 --nodes="$SLURM_NNODES" \
     bash slurm/launch_node.sh "$module" "$@" &
step=$!
stop=""
on_signal() {  # Slurm's warning signal reaches this shell only: pass it to every node's task
  stop=$1
  echo "[job $SLURM_JOB_ID] $1 at $(date -Is): asking the run to checkpoint and stop" >&2
  kill "-$1" "$step" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
code=0
while kill -0 "$step" 2>/dev/null; do
  wait "$step"
  code=$?
done
if [ "$stop" = USR1 ]; then  # the time-limit warning (--signal=B:USR1@...): continue in a new allocation
  echo "[job $SLURM_JOB_ID] stopped (exit $code) at $(date -Is); requeueing: the next start resumes" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
if [ "$stop" = TERM ]; then  # scancel, or preemption (Slurm requeues a preempted job itself if so configured)
  echo "[job $SLURM_JOB_ID] terminated (exit $code) at $(date -Is) after a checkpoint; not requeued" >&2
  exit "$code"
fi
echo "[job $SLURM_JOB_ID] finished with exit code $code at $(date -Is)"
exit "$code"
