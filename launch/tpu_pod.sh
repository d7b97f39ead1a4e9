#!/usr/bin/env bash
# sigma_jax on a Cloud TPU VM slice: every worker runs the same launch.train command with one
# config and one shared work directory; JAX's runtime finds the peers (launch.train
# --distributed=on). Nothing here orchestrates processes itself.
#
#   launch/tpu_pod.sh create   NAME ZONE ACCELERATOR        # e.g. sigma us-west4-a v5litepod-16
#   launch/tpu_pod.sh setup    NAME ZONE BUCKET             # copy + install on every worker,
#                                                           # mount gs://BUCKET at /mnt/sigma
#   launch/tpu_pod.sh train    NAME ZONE CONFIG RUN [--config.x=y ...]
#                                                           # work dir /mnt/sigma/runs/RUN
#   launch/tpu_pod.sh delete   NAME ZONE
#
# The work directory must be visible to every worker: a gcsfuse mount of the bucket (what
# `setup` does) or an NFS/Filestore path. Process 0 writes logs, metrics and DONE markers; every
# worker writes its part of each Orbax checkpoint. Put the original dataset files in the bucket
# too (gs://BUCKET/data/amazon2014/Beauty/...); `train` points $SIGMA_DATA_DIR at them.
#
# DRY_RUN=1 prints the gcloud commands instead of running them.
# TPU_VERSION (default v2-alpha-tpuv5-lite) is the TPU VM software image.
set -euo pipefail

usage() { awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit "${1:-2}"; }
run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

[[ $# -ge 1 ]] || usage
cmd=$1; shift
case "$cmd" in
  -h|--help|help) usage 0 ;;
  create)
    [[ $# -eq 3 ]] || usage
    name=$1 zone=$2 accel=$3
    run gcloud compute tpus tpu-vm create "$name" --zone="$zone" --accelerator-type="$accel" \
      --version="${TPU_VERSION:-v2-alpha-tpuv5-lite}"
    ;;
  setup)
    [[ $# -eq 3 ]] || usage
    name=$1 zone=$2 bucket=$3
    repo=$(cd "$(dirname "$0")/.." && pwd)
    # The package, without work directories or virtual environments.
    tarball=$(mktemp -d)/sigma_jax.tar.gz
    run tar -C "$repo" --exclude=./runs --exclude=./.venv --exclude=./.venv-ci --exclude=./.git \
      -czf "$tarball" .
    run gcloud compute tpus tpu-vm scp "$tarball" "$name":sigma_jax.tar.gz --zone="$zone" \
      --worker=all
    run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
      set -e
      mkdir -p ~/sigma_jax && tar -C ~/sigma_jax -xzf ~/sigma_jax.tar.gz
      cd ~/sigma_jax && python3 -m venv .venv && . .venv/bin/activate
      pip install -q -e . 'jax[tpu]==0.10.2'
      sudo mkdir -p /mnt/sigma && sudo chown \$USER /mnt/sigma
      (command -v gcsfuse >/dev/null || sudo apt-get install -y gcsfuse)
      mountpoint -q /mnt/sigma || gcsfuse --implicit-dirs $bucket /mnt/sigma"
    ;;
  train)
    [[ $# -ge 4 ]] || usage
    name=$1 zone=$2 config=$3 run_name=$4; shift 4
    overrides=""
    for o in "$@"; do overrides+=" $(printf '%q' "$o")"; done
    run gcloud compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all --command="
      cd ~/sigma_jax && . .venv/bin/activate
      SIGMA_DATA_DIR=/mnt/sigma/data python -m launch.train --distributed=on \
        --config=$config --workdir=/mnt/sigma/runs/$run_name$overrides"
    ;;
  delete)
    [[ $# -eq 2 ]] || usage
    run gcloud compute tpus tpu-vm delete "$1" --zone="$2" --quiet
    ;;
  *) usage ;;
esac
