#!/usr/bin/env bash
# Runs flmjax on the GPUs of one host: one process drives all of them (or those named by
# --gpus), with the mesh's batch axes over every device.
#
#   launch/gpu_single_host.sh --workdir=DIR [--config=configs/owt.py] [--mode=train]
#       [--gpus=0,1,2,3] [--dry-run] [-- --config.FIELD=VALUE ...]
#
# Environment it sets (anything already in XLA_FLAGS is kept, and wins):
#   XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true
#       lets XLA overlap the gradient all-reduce (and FSDP gathers) with compute
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
#       the share of GPU memory JAX preallocates (default 0.75), leaving room for cuDNN/NCCL
#   CUDA_VISIBLE_DEVICES=--gpus, when given
# Needs JAX with CUDA: pip install -U "jax[cuda12]" next to this package.
set -euo pipefail

source "$(dirname "$0")/common.sh"
OPTIONS="workdir config mode gpus"
workdir="" config="$repo/configs/owt.py" mode="train" gpus=""
parse_args "$@"

[[ -n "$workdir" ]] || fail "--workdir is required (see --help)"
[[ -z "$gpus" || "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  fail "--gpus=$gpus: GPU indices separated by commas, e.g. 0,1,2,3"

env_vars=("${gpu_env[@]}")
[[ -z "$gpus" ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")
run env "${env_vars[@]}" python -m flmjax.main "--config=$config" "--workdir=$workdir" \
  "--mode=$mode" ${extra[@]+"${extra[@]}"}
