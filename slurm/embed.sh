#!/usr/bin/env bash
#SBATCH --job-name=ant-embed
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.log
# The embedding pass on N nodes x G GPUs:
#   sbatch --nodes 2 --gres gpu:8 --export ALL,ANT_GPUS_PER_NODE=8 slurm/embed.sh [key=value ...]
# The pass resumes by itself (done rows are skipped), so a requeued job simply reruns it.
# Environment: as slurm/pretrain.sh, with ANT_CONFIG defaulting to configs/embed.yaml.
exec bash "${ANT_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/_job.sh" ant_dist.embed "${ANT_CONFIG-configs/embed.yaml}" "$@"
