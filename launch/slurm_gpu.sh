#!/usr/bin/env bash
# Runs flmjax on several GPU nodes of a SLURM cluster: srun starts one process per GPU;
# --config.distributed=True makes them join through jax.distributed.initialize(), which
# reads the coordinator, process count, process id and local GPU (SLURM_LOCALID) from
# SLURM's environment.
#
#   launch/slurm_gpu.sh --nodes=4 --workdir=/shared/runs/owt [--gpus-per-node=8]
#       [--config=configs/owt.py] [--mode=train] [--partition=P] [--time=HH:MM:SS]
#       [--dry-run] [-- --config.FIELD=VALUE ...]
#
# Run it inside an allocation (salloc) or from a login node (srun then allocates). The
# workdir must be on a filesystem every node sees (or gs://...); each node prepares the
# data in its own local /tmp/flmjax-data (its processes share it). XLA flags as in
# gpu_single_host.sh.
set -euo pipefail

usage() { sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
fail() { echo "slurm_gpu.sh: $*" >&2; exit 2; }

nodes="" gpus_per_node=8 workdir="" config="configs/owt.py" mode="train" partition=""
time_limit="" dry_run=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus_per_node="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --mode=*) mode="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    --) shift; extra=("$@"); break ;;
    *) fail "unknown argument $1 (see --help)" ;;
  esac
  shift
done

[[ -n "$nodes" && -n "$workdir" ]] || fail "--nodes and --workdir are required (see --help)"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || fail "--nodes=$nodes: a positive integer"
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] || fail "--gpus-per-node=$gpus_per_node: a positive integer"
[[ "$workdir" == /* || "$workdir" == gs://* ]] ||
  fail "--workdir=$workdir: an absolute path on a shared filesystem, or gs://BUCKET/DIR"
[[ -z "$time_limit" || "$time_limit" =~ ^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$ ]] ||
  fail "--time=$time_limit: SLURM's format, e.g. 12:00:00 or 2-00:00:00"
[[ -f "$config" ]] || fail "--config=$config: no such file"
case "$mode" in prepare|train|distill|sample|eval|pipeline|compile) ;;
  *) fail "--mode=$mode: one of prepare, train, distill, sample, eval, pipeline, compile" ;;
esac

srun_args=(--nodes="$nodes" --ntasks-per-node="$gpus_per_node" --gpus-per-node="$gpus_per_node"
           --kill-on-bad-exit=1)
[[ -z "$partition" ]] || srun_args+=(--partition="$partition")
[[ -z "$time_limit" ]] || srun_args+=(--time="$time_limit")
command=(srun "${srun_args[@]}"
         env "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
         "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
         python -m flmjax.main "--config=$config" "--workdir=$workdir" "--mode=$mode"
         --config.distributed=True --config.data.dir=/tmp/flmjax-data "${extra[@]}")
printf '+'; printf ' %q' "${command[@]}"; printf '\n'
if [[ $dry_run -eq 0 ]]; then exec "${command[@]}"; fi
