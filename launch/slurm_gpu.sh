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

source "$(dirname "$0")/common.sh"
OPTIONS="nodes gpus_per_node workdir config mode partition time"
nodes="" gpus_per_node=8 workdir="" config="$repo/configs/owt.py" mode="train" partition="" time=""
parse_args "$@"

[[ -n "$nodes" && -n "$workdir" ]] || fail "--nodes and --workdir are required (see --help)"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || fail "--nodes=$nodes: a positive integer"
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] ||
  fail "--gpus-per-node=$gpus_per_node: a positive integer"
[[ "$workdir" == /* || "$workdir" == gs://* ]] ||
  fail "--workdir=$workdir: an absolute path on a shared filesystem, or gs://BUCKET/DIR"
[[ -z "$time" || "$time" =~ ^(([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}|UNLIMITED|INFINITE)$ ]] ||
  fail "--time=$time: SLURM's format, e.g. 12:00:00, 2-00:00:00 or UNLIMITED"

srun_args=(--nodes="$nodes" --ntasks-per-node="$gpus_per_node" --gpus-per-node="$gpus_per_node"
           --kill-on-bad-exit=1)
[[ -z "$partition" ]] || srun_args+=(--partition="$partition")
[[ -z "$time" ]] || srun_args+=(--time="$time")
run srun "${srun_args[@]}" env "${gpu_env[@]}" python -m flmjax.main "--config=$config" \
  "--workdir=$workdir" "--mode=$mode" --config.distributed=True \
  --config.data.dir=/tmp/flmjax-data ${extra[@]+"${extra[@]}"}
