#!/usr/bin/env bash
# Run jaxrobust on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE gs://bucket/runs/cifar10_wrn \
#       --config configs/default.py:cifar10 [--config.streams.train.batch_size=1024 ...]
#
# Every worker runs the same command (SPMD); jax.distributed.initialize() finds
# the pod topology on its own, and the processes check at start that they got
# the same config. The workdir must be on storage all workers see (GCS), and
# datasets must be prepared as array_record under --config.data.data_dir (e.g.
# gs://bucket/tensorflow_datasets). Re-running the same command resumes; a
# preempted slice (SIGTERM on the workers) saves a checkpoint first.
#
# DRY_RUN=1 prints the command instead of running it. REPO_URL and REF (default:
# this checkout's origin and commit) say what the workers install.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE WORKDIR [launch.train flags...]" >&2
  exit 2
fi
TPU_NAME=$1; ZONE=$2; WORKDIR=$3; shift 3
REPO_URL=${REPO_URL:-$(git config --get remote.origin.url 2>/dev/null || true)}
REF=${REF:-$(git rev-parse HEAD 2>/dev/null || true)}
if [ -z "$REPO_URL" ] || [ -z "$REF" ]; then
  echo "error: set REPO_URL and REF (this checkout has no 'origin' remote or commit the workers" \
       "could clone)" >&2
  exit 2
fi
ARGS=$(printf " %q" "$@"); QWORKDIR=$(printf "%q" "$WORKDIR")
REMOTE="set -e
if [ ! -d jaxrobust ]; then git clone $REPO_URL jaxrobust; fi
cd jaxrobust && git fetch -q && git checkout -q $REF
python3 -m venv ~/jaxrobust-venv && . ~/jaxrobust-venv/bin/activate
pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
python -m launch.train --multihost --workdir $QWORKDIR$ARGS"
CMD=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE")
if [ -n "${DRY_RUN:-}" ]; then
  printf "%q " "${CMD[@]:0:9}"; printf -- '--command <<EOF\n%s\nEOF\n' "$REMOTE"
  exit 0
fi
exec "${CMD[@]}"
