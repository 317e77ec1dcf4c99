# Shared by the launch scripts (sourced, not run). A script sets OPTIONS (its --key=value
# options, as variable names with _ for -) and their defaults, then calls parse_args "$@":
# it fills those variables, dry_run (--dry-run) and extra (what follows --), and checks
# the options every script has (--config, --mode).

script="$(basename "$0")"
repo="$(CDPATH= cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)"
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
fail() { echo "$script: $*" >&2; exit 2; }
# The modes flmjax.main accepts, read from their one list (the keys of MODES).
modes="$(sed -n 's/^    "\([a-z]*\)":.*/\1/p' "$repo/flmjax/modes.py" | tr '\n' ' ')"
modes="${modes% }"

parse_args() {
  dry_run=0 extra=()
  while [[ $# -gt 0 ]]; do
    case "$1" in
      --dry-run) dry_run=1 ;;
      -h|--help) usage; exit 0 ;;
      --) shift; extra=("$@"); break ;;
      --*=*)
        local key="${1%%=*}"
        key="${key#--}" key="${key//-/_}"
        [[ " $OPTIONS " == *" $key "* ]] || fail "unknown argument $1 (see --help)"
        printf -v "$key" '%s' "${1#*=}" ;;
      *) fail "unknown argument $1 (see --help)" ;;
    esac
    shift
  done
  [[ -f "$config" ]] || fail "--config=$config: no such file"
  [[ " $modes " == *" $mode "* ]] || fail "--mode=$mode: one of ${modes// /, }"
}

run() {  # prints the command; runs it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

# The XLA GPU settings of gpu_single_host.sh and slurm_gpu.sh (XLA_FLAGS already set are
# kept, after ours, so they win).
gpu_env=("XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true${XLA_FLAGS:+ $XLA_FLAGS}"
         "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}")
