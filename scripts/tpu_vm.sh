#!/usr/bin/env bash
# Run train.py on every worker of a Cloud TPU VM (single host or pod slice) with gcloud.
#
#   scripts/tpu_vm.sh [--dry-run] COMMAND [-- TRAIN_ARGS...]
#
# COMMAND: create | setup | launch | logs | resume | delete | all (create, setup, launch, logs)
# Settings come from the environment (defaults in brackets):
#   TPU_NAME [jaxlab]  ZONE [us-central2-b]  ACCELERATOR [v4-8]  RUNTIME [tpu-ubuntu2204-base]
#   SPOT [1: preemptible spot capacity]  REPO_DIR [jaxlab]
#   OUT_DIR [/mnt/runs/$TPU_NAME]: must be one directory every worker sees (a gcsfuse or
#   Filestore mount); checkpoints go there, so `resume` after a preemption picks up from it.
# Example:
#   scripts/tpu_vm.sh all -- +experiment=shakespeare_char data.path=/mnt/data/input.txt
# --dry-run prints every command without running it.
set -euo pipefail

DRY_RUN=0
if [[ "${1:-}" == "--dry-run" ]]; then
  DRY_RUN=1
  shift
fi
COMMAND="${1:-}"
[[ -n "$COMMAND" ]] || { sed -n '2,16p' "$0"; exit 2; }
shift
if [[ "${1:-}" == "--" ]]; then shift; fi
TRAIN_ARGS=("$@")

TPU_NAME="${TPU_NAME:-jaxlab}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-1}"
REPO_DIR="${REPO_DIR:-jaxlab}"
OUT_DIR="${OUT_DIR:-/mnt/runs/$TPU_NAME}"
JAX_VERSION="$(sed -n 's/^jax==//p' "$(dirname "$0")/../requirements.txt")"

run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  if [[ "$DRY_RUN" == 0 ]]; then "$@"; fi
}

on_workers() {  # on_workers WORKER COMMAND_STRING
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker="$1" --command="$2"
}

train_command() {
  local args=""
  if ((${#TRAIN_ARGS[@]})); then args="$(printf ' %q' "${TRAIN_ARGS[@]}")"; fi
  # The same command on every worker; jax.distributed.initialize() finds the others by itself.
  echo "cd $REPO_DIR && nohup python train.py distributed.enabled=true out_dir=$OUT_DIR progress=false$args > train.log 2>&1 &"
}

create() {
  local capacity=()
  if [[ "$SPOT" == 1 ]]; then capacity=(--spot); fi
  run gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR" \
    --version="$RUNTIME" "${capacity[@]}"
}

setup() {
  run gcloud compute tpus tpu-vm scp --recurse "$(cd "$(dirname "$0")/.." && pwd)" "$TPU_NAME:~/$REPO_DIR" \
    --zone="$ZONE" --worker=all
  on_workers all "cd $REPO_DIR && pip install -r requirements.txt && pip install 'jax[tpu]==$JAX_VERSION'"
}

launch() { on_workers all "$(train_command)"; }
logs() { on_workers 0 "tail -f $REPO_DIR/train.log"; }
delete() { run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet; }

case "$COMMAND" in
  create) create ;;
  setup) setup ;;
  launch) launch ;;
  logs) logs ;;
  # A preempted spot VM is gone: make a new one and rerun the same command; it resumes from OUT_DIR.
  resume) delete || true; create; setup; launch; logs ;;
  delete) delete ;;
  all) create; setup; launch; logs ;;
  *) echo "unknown command '$COMMAND': use create, setup, launch, logs, resume, delete or all" >&2; exit 2 ;;
esac
