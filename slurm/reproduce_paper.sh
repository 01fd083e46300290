#!/usr/bin/env bash
# The paper reproduction as a chain of dependent Slurm jobs (docs/reproduce.md):
#   bash slurm/reproduce_paper.sh --config configs/paper/ant.yaml [--targets A,B] [--seeds 0,1] [key=value ...]
# fetch images (array over domains) -> pack (array) -> embed (slurm/embed.sh) -> pretrain
# (slurm/pretrain.sh) -> relearn (array over targets x methods x their grid points x seeds) -> select
# -> report; beside pretrain and relearn, baselines (array over targets x RecBole baselines x
# seeds, after embed), which the report waits for too. Each job is submitted with
# --dependency=afterok on the stages it needs (its "after" in the plan: report after select and
# baselines) and --kill-on-invalid-dep=yes, so a failed stage cancels the rest instead of leaving
# it pending.
# A stage whose outputs all exist is not submitted; a task whose output exists exits at once.
# The plan comes from `python -m ant_dist.reproduce ... --emit-slurm`: the jobs run the same
# commands as `python -m ant_dist.reproduce` on one machine. Run it where `sbatch` works; paths in
# the config are relative to the repository root (the jobs run there).
#
# sbatch options come from the config's `resources.<stage>` and can be overridden here:
#   ANT_PARTITION            partition of every job             ANT_SBATCH_ARGS  extra sbatch options, every job
#   ANT_<STAGE>_PARTITION    partition of one stage             ANT_<STAGE>_TIME time limit (e.g. 08:00:00)
#   ANT_<STAGE>_GPUS         GPUs per node (also the processes per node of embed/pretrain)
#   ANT_<STAGE>_NODES, ANT_<STAGE>_CPUS, ANT_<STAGE>_MEM
#   (STAGE: FETCH PACK EMBED BASELINES PRETRAIN RELEARN SELECT REPORT)
#   ANT_ARRAY_MAX            at most this many tasks of an array at once (sbatch --array=0-N%MAX)
#   ANT_PYTHON               the environment's python (default .venv/bin/python); ANT_CPU=1: CPU processes
# Prints one line per stage (name, job id) and writes them to <submission folder>/jobs.tsv.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
export ANT_PYTHON=${ANT_PYTHON:-$ROOT/.venv/bin/python}
export ANT_HOME=$ROOT

dir=$("$ANT_PYTHON" -m ant_dist.reproduce "$@" --emit-slurm)
[ -f "$dir/stages.tsv" ] || { echo "reproduce_paper.sh: no plan was written" >&2; exit 2; }
: > "$dir/jobs.tsv"
declare -A job_of
echo "plan: $dir (logs: $dir/logs/)"

while IFS=$'\t' read -r name kind n after done nodes gpus procs cpus mem time partition; do
  if [ "$done" = "1" ]; then
    echo "$name: done already, not submitted"
    continue
  fi
  up=${name^^}
  v=ANT_${up}_NODES; nodes=${!v:-$nodes}
  v=ANT_${up}_GPUS; gpus=${!v:-$gpus}; [ -n "${!v:-}" ] && procs=$gpus
  v=ANT_${up}_CPUS; cpus=${!v:-$cpus}
  v=ANT_${up}_MEM; mem=${!v:-$mem}
  v=ANT_${up}_TIME; time=${!v:-$time}
  v=ANT_${up}_PARTITION; partition=${!v:-${ANT_PARTITION:-$partition}}
  opts=(--parsable --job-name "ant-$name" --nodes "$nodes" --cpus-per-task "$cpus")
  [ "$gpus" != "0" ] && opts+=(--gres "gpu:$gpus")
  [ "$mem" != "-" ] && opts+=(--mem "$mem")
  [ "$time" != "-" ] && opts+=(--time "$time")
  [ -n "$partition" ] && [ "$partition" != "-" ] && opts+=(--partition "$partition")
  deps=()
  if [ "$after" != "-" ]; then
    IFS=, read -ra ups <<< "$after"
    for u in "${ups[@]}"; do [ -n "${job_of[$u]:-}" ] && deps+=("${job_of[$u]}"); done
  fi
  if [ "${#deps[@]}" -gt 0 ]; then
    opts+=(--dependency "afterok:$(IFS=:; echo "${deps[*]}")" --kill-on-invalid-dep=yes)
  fi
  # shellcheck disable=SC2206  # ANT_SBATCH_ARGS is split on spaces on purpose
  extra=(${ANT_SBATCH_ARGS:-})
  if [ "$kind" = "task" ]; then
    if [ "$n" -gt 1 ]; then
      opts+=(--array "0-$((n - 1))${ANT_ARRAY_MAX:+%$ANT_ARRAY_MAX}" --output "$dir/logs/%x-%A_%a.log")
    else
      opts+=(--output "$dir/logs/%x-%j.log")
    fi
    id=$(sbatch "${opts[@]}" "${extra[@]}" --export "ALL,ANT_HOME=$ROOT" \
         slurm/reproduce_task.sh "$dir/config.yaml" "$name")
  else  # a distributed stage: slurm/embed.sh or slurm/pretrain.sh with the plan's key=value options
    mapfile -t args < "$dir/$name.args"
    id=$(sbatch "${opts[@]}" "${extra[@]}" --ntasks-per-node 1 --output "$dir/logs/%x-%j.log" \
         --export "ALL,ANT_HOME=$ROOT,ANT_CONFIG=$(cat "$dir/$name.config"),ANT_GPUS_PER_NODE=$procs" \
         "slurm/$kind.sh" "${args[@]}")
  fi
  id=${id%%;*}  # --parsable prints "id" or "id;cluster"
  job_of[$name]=$id
  printf '%s\t%s\n' "$name" "$id" >> "$dir/jobs.tsv"
  echo "$name: job $id ($n task(s)${deps[*]:+, after ${deps[*]}})"  # after: space-separated job ids
done < "$dir/stages.tsv"
echo "submitted; follow with: squeue --me (the report goes to the config's report folder)"
