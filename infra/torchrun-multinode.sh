#!/usr/bin/env bash
# Multi-node distillation without Kubernetes (bare metal, Slurm, cloud VMs):
# run this SAME command on every node; torchrun's c10d rendezvous on
# WANLITE_RDZV_ENDPOINT forms the job, one rank per local GPU, FSDP2 across all.
#
#   WANLITE_NNODES=4 WANLITE_RDZV_ENDPOINT=node0:29400 WANLITE_RUN_ID=lite-1024-w47 \
#     infra/torchrun-multinode.sh --teacher s3://... --data s3://... --embeddings s3://... \
#       --init s3://... --preset lite-1024 --out s3://wanlite/store --resume
#
# Arguments are those of `python -m wanlite.distill.train` (see its --help). Every
# node needs the same environment (WANLITE_STORE / S3 endpoint and credentials,
# MLFLOW_TRACKING_URI; infra/README.md). A restarted job (torchrun restarts it up to
# WANLITE_MAX_RESTARTS times) resumes from the latest good checkpoint in the store
# when it has the same number of ranks; checkpoints do not resume on another world
# size, so an elastic range (WANLITE_NNODES=2:4) only helps while every node is up.
set -euo pipefail

: "${WANLITE_NNODES:?set WANLITE_NNODES (nodes, or MIN:MAX for an elastic job)}"
: "${WANLITE_RDZV_ENDPOINT:?set WANLITE_RDZV_ENDPOINT=host:port of the rendezvous (any one node)}"
: "${WANLITE_RUN_ID:?set WANLITE_RUN_ID, the same on every node of one job}"

exec "${PYTHON:-python}" -m torch.distributed.run \
  --nnodes="${WANLITE_NNODES}" \
  --nproc-per-node="${WANLITE_NPROC_PER_NODE:-gpu}" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="${WANLITE_RDZV_ENDPOINT}" \
  --rdzv-id="${WANLITE_RUN_ID}" \
  --max-restarts="${WANLITE_MAX_RESTARTS:-3}" \
  -m wanlite.distill.train "$@"
