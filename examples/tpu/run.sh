#!/bin/bash
# Run a distillax pipeline on every host of a multi-host Cloud TPU VM slice (e.g. v5e-32: 8 hosts).
#
#   TPU=my-tpu ZONE=us-west4-a examples/tpu/run.sh configs/quickstart.yaml run.name=qs-v5e32 \
#       'mesh={preset: fsdp}'
#
# The same command starts on every worker (--worker=all). DISTILLAX_DISTRIBUTED=auto makes
# launch.py call jax.distributed.initialize() with no arguments, and jax finds the slice's
# workers, the coordinator (worker 0) and this worker's id from the TPU metadata server.
# The repository (with .venv) must be at the same path on every worker, e.g. after
#   gcloud compute tpus tpu-vm scp --recurse --worker=all . "$TPU":~/distillax --zone "$ZONE"
# and run.dir must be a filesystem all workers share (GCS FUSE, Filestore): every worker writes
# its part of each checkpoint; only worker 0 writes the manifest, metrics and report.
set -euo pipefail

: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
REPO=${REPO:-~/distillax}
ARGS=$(printf ' %q' "$@")

gcloud compute tpus tpu-vm ssh "${TPU}" --zone "${ZONE}" --worker=all --command "
  cd ${REPO} && DISTILLAX_DISTRIBUTED=auto TOKENIZERS_PARALLELISM=false \
  .venv/bin/python launch.py${ARGS} 2>&1 | tee -a launch-\$(hostname).log
"
