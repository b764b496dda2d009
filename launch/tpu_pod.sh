#!/usr/bin/env bash
# Trains cotlab_jax on a Cloud TPU VM or pod slice, recreating the TPU and resuming after preemption.
#
#   launch/tpu_pod.sh --project=P --zone=us-west4-a --tpu_name=cotlab --accelerator_type=v5litepod-64 \
#       --config=configs/default.py --workdir=gs://BUCKET/runs/depth12 \
#       [--repo=https://github.com/OWNER/cotlab_jax.git --ref=main | --src=.] \
#       [--queued [--spot|--best_effort] | --spot] [--max_restarts=20] [--dry_run] \
#       [-- --config.model.num_hidden_layers=12 --config.mesh.fsdp=-1 --config.mesh.data=1]
#
# Every worker runs the same main command; jax.distributed finds the slice's other workers itself.
# The run directory must be shared by all workers and survive the VM, because the relaunch resumes
# from its latest checkpoint: a gs:// workdir is mounted with gcsfuse on every worker (rundir.py
# writes with plain file APIs, so it needs a mounted path), any other path must already be a shared
# mount (e.g. Filestore NFS) on the image.
set -euo pipefail

usage() {
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}

die() { echo "tpu_pod.sh: $*" >&2; exit 2; }

PROJECT="" ZONE="" TPU_NAME="" ACCELERATOR_TYPE="" RUNTIME_VERSION="" CONFIG="" WORKDIR=""
REPO="" REF="main" SRC="" QUEUED=0 SPOT=0 BEST_EFFORT=0 MAX_RESTARTS=20 DRY_RUN=0
EXTRA=()
while (($#)); do
  case "$1" in
    --project=*) PROJECT="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --tpu_name=*) TPU_NAME="${1#*=}" ;;
    --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime_version=*) RUNTIME_VERSION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --repo=*) REPO="${1#*=}" ;;
    --ref=*) REF="${1#*=}" ;;
    --src=*) SRC="${1#*=}" ;;
    --queued) QUEUED=1 ;;
    --spot) SPOT=1 ;;
    --best_effort) BEST_EFFORT=1 ;;
    --max_restarts=*) MAX_RESTARTS="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "tpu_pod.sh: unknown argument: $1" >&2; usage ;;
  esac
  shift
done

for flag in project zone tpu_name accelerator_type config workdir; do
  var="${flag^^}"
  [[ -n "${!var}" ]] || die "--$flag is required (see --help)"
done
[[ -n "$REPO" || -n "$SRC" ]] || die "give the source: --repo=GIT_URL [--ref=REF] or --src=LOCAL_DIR"
[[ -z "$REPO" || -z "$SRC" ]] || die "give only one of --repo and --src"
[[ -z "$SRC" || -f "$SRC/pyproject.toml" ]] || die "--src=$SRC is not a cotlab_jax checkout"
((BEST_EFFORT == 0 || QUEUED == 1)) || die "--best_effort needs --queued"
((SPOT + BEST_EFFORT < 2)) || die "give only one of --spot and --best_effort"
[[ "$MAX_RESTARTS" =~ ^[0-9]+$ ]] || die "--max_restarts must be a non-negative integer"
[[ "$WORKDIR" == gs://* || "$WORKDIR" == /* ]] ||
  die "--workdir must be gs://BUCKET/PATH or an absolute path on a mount shared by all workers"

# The software image follows the TPU generation unless given.
if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
    v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
    *) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
  esac
fi

GCLOUD_TPU=(gcloud compute tpus tpu-vm)
GCLOUD_QR=(gcloud compute tpus queued-resources)
WHERE=(--project="$PROJECT" --zone="$ZONE")
REMOTE_SRC="cotlab_jax"                  # relative to the login user's home on every worker
REMOTE_VENV="\$HOME/cotlab_venv"         # expanded by the worker's shell

# The path main.py sees: gs://BUCKET/PATH is mounted at ~/gcs/BUCKET on every worker.
if [[ "$WORKDIR" == gs://* ]]; then
  BUCKET="${WORKDIR#gs://}"; BUCKET="${BUCKET%%/*}"
  RUN_WORKDIR="\$HOME/gcs/${WORKDIR#gs://}"
else
  BUCKET=""
  RUN_WORKDIR="$WORKDIR"
fi

STEP=0
# Prints a command numbered and shell-quoted, then runs it (unless --dry_run).
show() {
  local out="" arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+="$arg "
    else out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  STEP=$((STEP + 1))
  echo "[$STEP] ${out% }"
}
run() { show "$@"; ((DRY_RUN)) || "$@"; }
on_workers() { run "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=all --command="$1"; }

# Sets STATE to the TPU's state (READY, PREEMPTED, ...; for a queued resource ACTIVE, SUSPENDED,
# FAILED, ...), empty when it does not exist. A dry run shows the query and takes the TPU as missing.
# "quiet" polls without printing.
STATE=""
tpu_state() {
  local cmd
  if ((QUEUED)); then cmd=("${GCLOUD_QR[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format="value(state.state)")
  else cmd=("${GCLOUD_TPU[@]}" describe "$TPU_NAME" "${WHERE[@]}" --format="value(state)")
  fi
  [[ "${1:-}" == quiet ]] || show "${cmd[@]}"
  STATE=""
  ((DRY_RUN)) || STATE=$("${cmd[@]}" 2>/dev/null) || STATE=""
}

create_tpu() {
  local provisioning=()
  ((SPOT)) && provisioning=(--spot)
  ((BEST_EFFORT)) && provisioning=(--best-effort)
  if ((QUEUED)); then
    run "${GCLOUD_QR[@]}" create "$TPU_NAME" --node-id="$TPU_NAME" "${WHERE[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" "${provisioning[@]}"
    # A queued resource waits for capacity; its node exists once the state is ACTIVE.
    tpu_state
    ((DRY_RUN)) && return
    until [[ "$STATE" == ACTIVE ]]; do
      [[ "$STATE" == FAILED || "$STATE" == SUSPENDED ]] && die "queued resource $TPU_NAME is $STATE"
      echo "waiting for $TPU_NAME (${STATE:-pending}) ..."; sleep 60
      tpu_state quiet
    done
  else
    run "${GCLOUD_TPU[@]}" create "$TPU_NAME" "${WHERE[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" "${provisioning[@]}"
  fi
}

delete_tpu() {
  if ((QUEUED)); then run "${GCLOUD_QR[@]}" delete "$TPU_NAME" "${WHERE[@]}" --force --quiet
  else run "${GCLOUD_TPU[@]}" delete "$TPU_NAME" "${WHERE[@]}" --quiet
  fi
}

healthy() { [[ "$1" == READY || "$1" == ACTIVE ]]; }

# Source, workdir mount and package on every worker; each step is safe to repeat on a live VM.
setup_workers() {
  if [[ -n "$REPO" ]]; then
    on_workers "set -e; [ -d $REMOTE_SRC/.git ] || git clone $REPO $REMOTE_SRC; cd $REMOTE_SRC; git fetch origin $REF; git checkout --force FETCH_HEAD"
  else
    # Only the sources travel: not the local venv, runs or git history.
    local tarball="${TMPDIR:-/tmp}/cotlab_jax_src.tar.gz"
    run tar -czf "$tarball" -C "$SRC" --exclude=.venv --exclude=.git --exclude=runs --exclude=bench_results .
    run "${GCLOUD_TPU[@]}" scp "$tarball" "$TPU_NAME:cotlab_jax_src.tar.gz" "${WHERE[@]}" --worker=all
    on_workers "set -e; mkdir -p $REMOTE_SRC; tar -xzf cotlab_jax_src.tar.gz -C $REMOTE_SRC"
  fi
  if [[ -n "$BUCKET" ]]; then
    # --rename-dir-limit: orbax finalises a checkpoint by renaming its temporary directory.
    on_workers "set -e; if ! command -v gcsfuse >/dev/null; then echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list; curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null; sudo apt-get update -q; sudo apt-get install -yq gcsfuse; fi; mkdir -p \$HOME/gcs/$BUCKET; mountpoint -q \$HOME/gcs/$BUCKET || gcsfuse --implicit-dirs --rename-dir-limit=1000000 $BUCKET \$HOME/gcs/$BUCKET"
  fi
  # TPU images ship Python 3.10; the package needs 3.11, which uv fetches.
  on_workers "set -e; cd $REMOTE_SRC; python3 -m pip install -q --user uv; python3 -m uv venv -q --seed --allow-existing --python 3.11 $REMOTE_VENV; $REMOTE_VENV/bin/pip install -q -e \".[tpu]\""
}

MAIN_CMD="cd $REMOTE_SRC && $REMOTE_VENV/bin/python -m cotlab_jax.main --config=$CONFIG --workdir=$RUN_WORKDIR"
for arg in "${EXTRA[@]}"; do MAIN_CMD+=" $(printf '%q' "$arg")"; done

# A finished run leaves results.json; a worker stopped by SIGTERM exits 0 without it.
finished() {
  ((DRY_RUN)) && return 0
  "${GCLOUD_TPU[@]}" ssh "$TPU_NAME" "${WHERE[@]}" --worker=0 --command="test -f $RUN_WORKDIR/results.json"
}

restarts=0
while :; do
  tpu_state
  if ! healthy "$STATE"; then
    [[ -n "$STATE" ]] && delete_tpu    # PREEMPTED, SUSPENDED, FAILED, ...: only a new VM helps
    create_tpu
  fi
  setup_workers
  rc=0
  on_workers "$MAIN_CMD" || rc=$?      # every worker's log streams here
  if ((DRY_RUN)); then
    echo "# after a preemption (TPU not READY/ACTIVE): delete it, then repeat from [1]; the run resumes"
    exit 0
  fi
  if ((rc == 0)) && finished; then
    echo "tpu_pod.sh: run finished; results in $WORKDIR/results.json"
    exit 0
  fi
  tpu_state quiet
  if healthy "$STATE" && ((rc != 0)); then
    die "the main command failed (exit $rc) on a healthy TPU ($STATE); not retrying"
  fi
  ((restarts < MAX_RESTARTS)) || die "gave up after $MAX_RESTARTS restarts (TPU ${STATE:-gone})"
  restarts=$((restarts + 1))
  echo "tpu_pod.sh: TPU ${STATE:-gone} after exit $rc; restart $restarts/$MAX_RESTARTS resumes from $WORKDIR"
done
