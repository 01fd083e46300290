#!/usr/bin/env bash
# One Slurm task per node runs this: `accelerate launch` for this node's share of the processes.
#   launch_node.sh MODULE [key=value ...]      (called by slurm/pretrain.sh and slurm/embed.sh)
# Environment (set by the batch script): ANT_PYTHON, ANT_GPUS_PER_NODE, ANT_CPU, ANT_CONFIG,
# MASTER_ADDR, MASTER_PORT; SLURM_NNODES and SLURM_NODEID come from Slurm.
#
# Stop signals: SIGUSR1/SIGTERM reaching this task are passed on to the training processes
# (the launcher's children), never to the launcher itself, whose default action on SIGUSR1 is to
# die and take the processes with it before they can checkpoint.
set -uo pipefail
module=$1; shift
nodes=${SLURM_NNODES:-1}
node=${SLURM_NODEID:-0}
per_node=${ANT_GPUS_PER_NODE:-1}
total=$(( nodes * per_node ))
args=(--num_machines "$nodes" --machine_rank "$node" --num_processes "$total"
      --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT"
      --mixed_precision no --dynamo_backend no)
if [ -n "${ANT_ACCELERATE_CONFIG:-}" ]; then
  args=(--config_file "$ANT_ACCELERATE_CONFIG" "${args[@]}")
elif [ "$total" -gt 1 ]; then
  args+=(--multi_gpu)
fi
if [ "${ANT_CPU:-0}" = "1" ]; then
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
  # DDP on CPU needs ACCELERATE_USE_CPU; under DeepSpeed it would silently turn the run into
  # DDP (DeepSpeed finds the CPU by itself and the trainer picks gloo)
  if ! grep -qs "distributed_type: *DEEPSPEED" "${ANT_ACCELERATE_CONFIG:-/dev/null}"; then
    export ACCELERATE_USE_CPU=1
  fi
fi
config=()
[ -n "${ANT_CONFIG:-}" ] && config=(--config "$ANT_CONFIG")

# The launcher starts with SIGUSR1 ignored (inherited): Slurm may signal every process of the
# step, and the launcher must outlive its processes' checkpoint. The training processes install
# their own handler, which replaces the inherited "ignore".
(trap '' USR1; exec "${ANT_PYTHON:-python}" -m accelerate.commands.launch "${args[@]}" -m "$module" \
    "${config[@]}" "$@") &
launcher=$!
forward() {
  echo "[node $node] $1 received: passing it to the training processes" >&2
  pkill "-$1" -P "$launcher" || true
}
trap 'forward USR1' USR1
trap 'forward TERM' TERM
# `wait` returns early when a trapped signal arrives: keep waiting for the launcher itself
while kill -0 "$launcher" 2>/dev/null; do
  wait "$launcher"
  code=$?
done
exit "${code:-0}"
