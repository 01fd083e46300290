#!/usr/bin/env bash
#SBATCH --job-name=ant-task
#SBATCH --ntasks=1
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
# One task of the reproduction plan (submitted by slurm/reproduce_paper.sh, one per array index):
#   sbatch [--array 0-N] slurm/reproduce_task.sh CONFIG STAGE
# runs `python -m ant_dist.reproduce --config CONFIG --task STAGE:$SLURM_ARRAY_TASK_ID`.
# Before the time limit (or on `scancel --signal=USR1 --batch JOB`) the task is asked to stop
# (SIGTERM, which every stage handles: a re-learning run checkpoints, the image fetcher writes its
# report) and, when it exits 75 (stopped, resumable), requeues itself: the next start resumes.
set -uo pipefail
config=$1; stage=$2
cd "${ANT_HOME:-${SLURM_SUBMIT_DIR:-.}}" || exit 2
py=${ANT_PYTHON:-$PWD/.venv/bin/python}
echo "[job $SLURM_JOB_ID] start $(date -Is), restart ${SLURM_RESTART_COUNT:-0}, $stage:${SLURM_ARRAY_TASK_ID:-0}"
"$py" -m ant_dist.reproduce --config "$config" --task "$stage:${SLURM_ARRAY_TASK_ID:-0}" &
child=$!
stop=""
on_signal() {  # the warning signal reaches this shell only: pass it on as SIGTERM
  stop=$1
  kill -TERM "$child" 2>/dev/null
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM
while :; do  # `wait` returns early when a trapped signal arrives: wait again while the task runs
  wait "$child"
  code=$?
  kill -0 "$child" 2>/dev/null || break
done
# Requeue only after the warning signal: SIGTERM comes from scancel (or a preemption, which Slurm
# requeues by itself when configured to), and a cancelled job must stay cancelled.
if [ "$stop" = "USR1" ] && [ "$code" = "75" ]; then
  echo "[job $SLURM_JOB_ID] stopped at $(date -Is) after a checkpoint; requeueing" >&2
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "[job $SLURM_JOB_ID] finished with exit code $code at $(date -Is)"
exit "$code"
