#!/usr/bin/env bash
# Run train.py on every worker of a Cloud TPU VM (single host or pod slice) with gcloud.
#
#   scripts/tpu_vm.sh [OPTIONS] COMMAND [-- TRAIN_ARGS...]
#
# COMMAND: create | setup | launch | logs | resume | delete | all (create, setup, launch, logs)
#   resume: delete the (preempted) VM, then all; the same command resumes from OUT_DIR.
# OPTIONS, anywhere before `--` (everything after it goes to train.py):
#   --dry-run   print every command, run none
#   -y, --yes   don't ask: create, delete, resume and all create or delete paid resources, so
#               without --yes they print their commands and ask `Proceed? [y/N]` on the terminal
#               (no terminal: they refuse)
#   -h, --help  print this help
# Settings come from the environment (defaults in brackets):
#   TPU_NAME [jaxlab]  ZONE [us-central2-b]  ACCELERATOR [v4-8]  RUNTIME [tpu-ubuntu2204-base]
#   SPOT [1: preemptible spot capacity]  REPO_DIR [jaxlab]
#   OUT_DIR [/mnt/runs/$TPU_NAME]: must be one directory every worker sees (a gcsfuse or
#   Filestore mount); checkpoints go there, so `resume` after a preemption picks up from it.
#   MOUNT_CMD [none]: a shell command `setup` runs on every worker after the install, e.g.
#   'mkdir -p /mnt/runs && gcsfuse --implicit-dirs BUCKET /mnt/runs': a new VM (create, resume)
#   mounts nothing by itself, and without OUT_DIR's mount a resumed run would start from step 0.
# Example:
#   scripts/tpu_vm.sh all -- +experiment=shakespeare_char data.path=/mnt/data/input.txt
set -euo pipefail

usage() { awk 'NR == 1 { next } !/^#/ { exit } { sub(/^# ?/, ""); print }' "$0"; }
usage_error() { echo "tpu_vm.sh: $1" >&2; usage >&2; exit 2; }

DRY_RUN=0
YES=0
COMMAND=""
TRAIN_ARGS=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -y | --yes) YES=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    -*) usage_error "unknown option '$1' (train.py's arguments go after --)" ;;
    *)
      [[ -z "$COMMAND" ]] || usage_error "one COMMAND only, got '$COMMAND' and '$1' (train.py's arguments go after --)"
      COMMAND="$1"
      ;;
  esac
  shift
done
case "$COMMAND" in
  create | setup | launch | logs | resume | delete | all) ;;
  "") usage_error "no COMMAND" ;;
  *) usage_error "unknown command '$COMMAND': use create, setup, launch, logs, resume, delete or all" ;;
esac

TPU_NAME="${TPU_NAME:-jaxlab}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR="${ACCELERATOR:-v4-8}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
SPOT="${SPOT:-1}"
REPO_DIR="${REPO_DIR:-jaxlab}"
OUT_DIR="${OUT_DIR:-/mnt/runs/$TPU_NAME}"
MOUNT_CMD="${MOUNT_CMD:-}"
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
  local cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" --accelerator-type="$ACCELERATOR"
    --version="$RUNTIME")
  if [[ "$SPOT" == 1 ]]; then cmd+=(--spot); fi
  run "${cmd[@]}"
}

setup() {
  run gcloud compute tpus tpu-vm scp --recurse "$(cd "$(dirname "$0")/.." && pwd)" "$TPU_NAME:~/$REPO_DIR" \
    --zone="$ZONE" --worker=all
  on_workers all "cd $REPO_DIR && pip install -r requirements.txt && pip install 'jax[tpu]==$JAX_VERSION'"
  if [[ -n "$MOUNT_CMD" ]]; then on_workers all "$MOUNT_CMD"; fi
}

launch() { on_workers all "$(train_command)"; }
logs() { on_workers 0 "tail -f $REPO_DIR/train.log"; }
delete() { run gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" --quiet; }

steps() {
  case "$COMMAND" in
    create) create ;;
    setup) setup ;;
    launch) launch ;;
    logs) logs ;;
    # A preempted spot VM is gone: make a new one and rerun the same command; it resumes from OUT_DIR.
    resume) delete || true; create; setup; launch; logs ;;
    delete) delete ;;
    all) create; setup; launch; logs ;;
  esac
}

case "$COMMAND" in
  create | delete | resume | all)
    if [[ "$DRY_RUN" == 0 && "$YES" == 0 ]]; then
      if [[ ! -t 0 ]]; then
        echo "tpu_vm.sh: '$COMMAND' creates or deletes paid Cloud TPU resources and there is no terminal to ask on: pass --yes (or --dry-run to see the commands)" >&2
        exit 1
      fi
      echo "tpu_vm.sh $COMMAND will run:" >&2
      DRY_RUN=1
      steps >&2
      DRY_RUN=0
      printf 'Proceed? [y/N] ' >&2
      answer=""
      read -r answer || true
      case "$answer" in
        [yY] | [yY][eE][sS]) ;;
        *) echo "tpu_vm.sh: aborted, nothing was run" >&2; exit 1 ;;
      esac
    fi
    ;;
esac
steps
