#!/usr/bin/env bash
# The bench (python -m flmjax.bench) at the two GPU shapes of docs/performance.md, before
# (plain output head, plain attention) and after (the fused head, the Pallas flash attention
# with the soft cap inside), one JSON line each.
#
#   launch/gpu_bench.sh [--size=gpu|tiny] [--timeout=110] [--dry-run] [-- --config.FIELD=VALUE ...]
#
# gpu (the default): DiT small (D 768, 12 blocks, 12 heads, bfloat16 blocks)
#   - at L 128, V 8192, batch 128 (the shape of the H200 entry in docs/results.md);
#   - at the OpenWebText shape, L 1024, V 50258, batch 64 (the paper's batch per GPU; XLA
#     plans both codes' train steps within an H100's 80 GiB and an H200's 141 GiB:
#     --mode=compile, docs/performance.md), one-step sampling at batch 64.
#   Four bench runs, each compiling its step (47 to 50 s on an H200).
# tiny: the same four runs at a toy size, on any machine (a check of the script on a CPU).
# The "after" runs also profile their step (--profile: "shares" by part of the model), which
# needs XLA's command buffers off; every run goes without them, so that before and after
# are timed alike (on an H200 at L 128 the step took 58.3 ms without, 58.4 ms with them).
# First a check: the flash kernel against the plain path in bfloat16, values and gradients
# (a test of tests/test_dit.py, so pytest and pytest-xdist, the [test] extra; on the GPU
# with --size=gpu, else on the CPU in Pallas's interpret mode), at most 60 s, one JSON line
# {"check": "flash_bfloat16", "passed": ..., "commit": ...} ("error" when it did not pass).
# Then a sweep of the flash kernels' tiles at the OWT shape (bench --flash_sweep: each
# kernel alone at its default tile and at each of `tiles` below), at most 75 s, one line:
# the bench's JSON with "sweep" and "commit" added; the "after" runs take its best tiles
# (--config.model.flash_tiles), the default ones if it failed.
# Then each line is the bench's JSON with "shape", "code" (before or after), "commit" and,
# after, "flash_tiles" (the sweep's best, "" for the defaults) added;
# a run that fails, or runs past --timeout seconds, gives a line with "error" instead, the
# others still run, and the script then exits 1 (the check, the sweep and four runs of
# 110 s at most fit a call of 10 minutes). XLA_PYTHON_CLIENT_MEM_FRACTION is 0.9 unless
# set (JAX's default preallocation, 0.75, leaves little room for the OWT shape's plain step).
set -euo pipefail

cd "$(dirname "$0")/.."
size=gpu limit=110 dry_run=0 extra=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --size=*) size="${1#*=}" ;;
    --timeout=*) limit="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "gpu_bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

common=(--config=configs/tiny.py --noise=latent --sample_steps=1 --repeats=5)
case "$size" in
  gpu)
    model=(--config.model.width=768 --config.model.depth=12 --config.model.heads=12
           --config.model.cond_width=128)
    small=(--vocab_size=8192 --config.data.seq_len=128 --config.batch_size=128)
    owt=(--vocab_size=50258 --config.data.seq_len=1024 --config.batch_size=64
         --sample_batch=64)
    # rows per program x per loop step / warps / stages (every block and step divides both
    # L): 3 stages, which did best in the search of docs/results.md (entry "Flash kernel
    # tiles ..."), with blocks of 64 and 128 rows and steps of 32 and 64, and 4 stages
    tiles=64x32/4/3,64x64/4/3,128x32/4/3,128x64/4/3,128x64/4/2,64x64/4/4 ;;
  tiny)
    model=(--config.model.width=32 --config.model.depth=1 --config.model.heads=2
           --config.model.cond_width=16 --repeats=2)
    small=(--vocab_size=512 --config.data.seq_len=64 --config.batch_size=4)
    owt=(--vocab_size=1024 --config.data.seq_len=128 --config.batch_size=2 --sample_batch=4)
    tiles=32x64/4/2 ;;
  *) echo "gpu_bench.sh: --size=$size: gpu or tiny" >&2; exit 2 ;;
esac
[[ "$limit" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_bench.sh: --timeout=$limit: seconds, a positive integer" >&2; exit 2; }
commit="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}"
export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_command_buffer="

before=(--config.model.output_head=plain --config.model.attention=plain)
after=(--config.model.output_head=auto --config.model.attention=flash)
profiles="$(mktemp -d)"
trap 'rm -rf "$profiles"' EXIT
failed=0
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }  # a command, as --dry-run lists it
# what a command that exited with status $1 under a limit of $2 seconds did wrong
error_of() { if [[ $1 -eq 124 ]]; then echo "timed out after $2 s"; else echo "exit $1"; fi; }

platform=cpu
[[ $size == gpu ]] && platform=cuda
check=(env JAX_PLATFORMS="${JAX_PLATFORMS:-$platform}" python3 -m pytest -q -p no:cacheprovider
       tests/test_dit.py -k "kernels_equal and flash-False-bfloat16")
if [[ $dry_run -eq 1 ]]; then
  show "${check[@]}"
else
  passed=false error=""
  check_limit=$(( limit < 60 ? limit : 60 ))
  if timeout "$check_limit" "${check[@]}" >&2; then passed=true; else
    error=", \"error\": \"$(error_of $? "$check_limit")\""
    failed=1
  fi
  echo "{\"check\": \"flash_bfloat16\", \"passed\": $passed, \"commit\": \"$commit\"$error}"
fi
sweep_limit=$(( limit < 75 ? limit : 75 ))
sweep=(python3 -m flmjax.bench "${common[@]}" "${model[@]}" "${owt[@]}" --flash_sweep="$tiles"
       ${extra[@]+"${extra[@]}"})
best=""  # the tiles of the "after" runs, "" for the defaults
if [[ $dry_run -eq 1 ]]; then
  show "${sweep[@]}"
  best="<the sweep's best>"
elif report="$(timeout "$sweep_limit" "${sweep[@]}")" && best="$(python3 -c "import json, sys; \
print(json.load(sys.stdin)['best'])" <<< "$report")"; then
  python3 -c "import json, sys; d = json.load(sys.stdin); \
print(json.dumps({'sweep': 'flash', 'commit': '$commit', **d}))" <<< "$report"
else
  error="$(error_of $? "$sweep_limit")"
  echo "{\"sweep\": \"flash\", \"commit\": \"$commit\", \"error\": \"$error\"}"
  failed=1
  best=""
fi
[[ -n $best ]] && after+=(--config.model.flash_tiles="$best")
for shape in small owt; do
  for code in before after; do
    declare -n sizes="$shape" variant="$code"
    profile=()
    [[ $code == after ]] && profile=(--profile="$profiles/$shape")
    command=(python3 -m flmjax.bench "${common[@]}" "${model[@]}" "${sizes[@]}"
             "${variant[@]}" ${profile[@]+"${profile[@]}"} ${extra[@]+"${extra[@]}"})
    if [[ $dry_run -eq 1 ]]; then
      show "${command[@]}"
      continue
    fi
    fields="\"shape\": \"$shape\", \"code\": \"$code\", \"commit\": \"$commit\""
    [[ $code == after ]] && fields+=", \"flash_tiles\": \"$best\""
    if report="$(timeout "$limit" "${command[@]}")" && line="$(python3 -c "import json, sys; \
d = json.load(sys.stdin); d.update(json.loads(sys.argv[1])); print(json.dumps(d))" \
"{$fields}" <<< "$report")"; then
      echo "$line"
    else
      echo "{$fields, \"error\": \"$(error_of $? "$limit")\"}"
      failed=1
    fi
  done
done
exit "$failed"
