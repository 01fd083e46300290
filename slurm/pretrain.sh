#!/usr/bin/env bash
#SBATCH --job-name=ant-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
# Pre-training on N nodes x G GPUs (see slurm/README.md):
#   sbatch --nodes 4 --gres gpu:8 --export ALL,ANT_GPUS_PER_NODE=8 slurm/pretrain.sh [key=value ...]
# One task per node runs `accelerate launch` for its GPUs (slurm/launch_node.sh). Before the
# time limit (and on `scancel --signal=USR1 --batch JOB`) the run checkpoints at the next step
# boundary, the job requeues itself, and the requeued job continues with resume=auto in the same
# run folder and the same W&B run.
# Environment: ANT_CONFIG (default configs/pretrain.yaml), ANT_GPUS_PER_NODE (default: the
# node's GPUs, else 1), ANT_CPU=1 (CPU processes over gloo, for tests), ANT_PYTHON (default
# .venv/bin/python), ANT_ACCELERATE_CONFIG (e.g. configs/accelerate/zero2.yaml for DeepSpeed).
exec bash "${ANT_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/_job.sh" ant_dist.pretrain "${ANT_CONFIG-configs/pretrain.yaml}" "$@"
