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

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 2; }
fail() { echo "gpu_single_host.sh: $*" >&2; exit 2; }

workdir="" config="configs/owt.py" mode="train" gpus="" dry_run=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --workdir=*) workdir="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --mode=*) mode="${1#*=}" ;;
    --gpus=*) gpus="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) usage ;;
    --) shift; extra=("$@"); break ;;
    *) fail "unknown argument $1 (see --help)" ;;
  esac
  shift
done

[[ -n "$workdir" ]] || fail "--workdir is required (see --help)"
[[ -f "$config" ]] || fail "--config=$config: no such file"
[[ -z "$gpus" || "$gpus" =~ ^[0-9]+(,[0-9]+)*$ ]] ||
  fail "--gpus=$gpus: GPU indices separated by commas, e.g. 0,1,2,3"
case "$mode" in prepare|train|distill|sample|eval|pipeline|compile) ;;
  *) fail "--mode=$mode: one of prepare, train, distill, sample, eval, pipeline, compile" ;;
esac

env_vars=("XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
          "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}")
[[ -z "$gpus" ]] || env_vars+=("CUDA_VISIBLE_DEVICES=$gpus")
command=(env "${env_vars[@]}" python -m flmjax.main "--config=$config" "--workdir=$workdir"
         "--mode=$mode" "${extra[@]}")
printf '+'; printf ' %q' "${command[@]}"; printf '\n'
if [[ $dry_run -eq 0 ]]; then exec "${command[@]}"; fi
