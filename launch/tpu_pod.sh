#!/usr/bin/env bash
# Runs flmjax on a Cloud TPU VM slice: creates the slice (or reuses it by name), installs
# this checkout on every worker, and runs the same main command on all of them, streaming
# their logs. Each worker is one JAX process; --config.distributed=True makes them join
# through jax.distributed.initialize(), which discovers the slice itself.
#
#   launch/tpu_pod.sh --name=flm-owt --zone=us-east5-a --accelerator=v5litepod-64 \
#       --version=v2-alpha-tpuv5-lite --workdir=gs://BUCKET/owt \
#       [--config=configs/owt.py] [--mode=train] [--dry-run] [-- --config.FIELD=VALUE ...]
#
# The workdir must be on Cloud Storage (gs://...), which every worker sees; the prepared
# data go to a local directory on each worker (/tmp/flmjax-data). Rerunning the same
# command resumes from the latest checkpoint, on this or another slice size. When done:
#   gcloud compute tpus tpu-vm stop NAME --zone=ZONE     # keep the slice, stop billing
#   gcloud compute tpus tpu-vm delete NAME --zone=ZONE   # remove it
set -euo pipefail

source "$(dirname "$0")/common.sh"
OPTIONS="name zone accelerator version workdir config mode"
name="" zone="" accelerator="" version="" workdir="" config="$repo/configs/owt.py" mode="train"
parse_args "$@"

[[ -n "$name" && -n "$zone" && -n "$accelerator" && -n "$version" && -n "$workdir" ]] ||
  fail "--name, --zone, --accelerator, --version and --workdir are required (see --help)"
[[ "$name" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] ||
  fail "--name=$name: lower-case letters, digits and dashes, starting with a letter"
[[ "$accelerator" =~ ^v[0-9]+[a-z]*(pod)?-[0-9]+$ ]] ||
  fail "--accelerator=$accelerator: a TPU type such as v5litepod-64, v5p-32 or v4-32"
[[ "$workdir" == gs://* ]] ||
  fail "--workdir=$workdir: the workers share no disk; use a Cloud Storage path gs://BUCKET/DIR"
# The workers get this checkout's last commit (git archive HEAD), so the config must be
# there, as it is here; they read it at its path in the repository.
given="$config"
config="$(CDPATH= cd -- "$(dirname -- "$config")" && pwd -P)/$(basename -- "$config")"
root="$(CDPATH= cd -- "$repo" && pwd -P)"
[[ "$config" == "$root/"* ]] ||
  fail "--config=$given: not in this checkout ($repo), whose last commit the workers get"
config="${config#"$root/"}"
git -C "$repo" cat-file -e "HEAD:$config" 2>/dev/null ||
  fail "--config=$config: not in this checkout's last commit, which is what the workers get; give its path in the repository (e.g. configs/owt.py) and commit it"
git -C "$repo" diff --quiet HEAD -- "$config" ||
  fail "--config=$config has changes that are not committed; the workers would run its last commit: commit them"

archive="/tmp/flmjax-$name.tar.gz"
tpu=(gcloud compute tpus tpu-vm)
# Each worker gets a virtual environment with Python 3.11 (the images' own Python may be
# older), made by uv, which pip installs for the user and which fetches that Python.
venv=flmjax-venv
setup="PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install -q --user uv && python3 -m uv venv -q --python 3.11 --allow-existing $venv && python3 -m uv pip install -q --python $venv/bin/python -e 'flmjax[tpu,hf]'"
main=("../$venv/bin/python" -m flmjax.main "--config=$config" "--workdir=$workdir" "--mode=$mode"
      --config.distributed=True --config.data.dir=/tmp/flmjax-data ${extra[@]+"${extra[@]}"})
printf -v main_line ' %q' "${main[@]}"

echo "# pack this checkout's last commit (before anything is created):"
run git -C "$repo" archive --format=tar.gz --prefix=flmjax/ -o "$archive" HEAD
if [[ $dry_run -eq 1 ]] || ! "${tpu[@]}" describe "$name" --zone="$zone" >/dev/null 2>&1; then
  echo "# create the slice unless it exists:"
  run "${tpu[@]}" create "$name" --zone="$zone" --accelerator-type="$accelerator" \
    --version="$version"
fi
echo "# install it on every worker:"
run "${tpu[@]}" scp "$archive" "$name:flmjax.tar.gz" --zone="$zone" --worker=all
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="rm -rf flmjax && tar xzf flmjax.tar.gz && $setup"
echo "# run on all workers (logs of every worker stream here):"
run "${tpu[@]}" ssh "$name" --zone="$zone" --worker=all --command="cd flmjax &&$main_line"
