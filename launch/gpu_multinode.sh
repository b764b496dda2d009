#!/usr/bin/env bash
# Trains cotlab_jax on several GPU hosts over plain ssh, one process per host (under SLURM use
# launch/slurm_gpu.sbatch instead).
#
#   launch/gpu_multinode.sh --hosts=gpu0,gpu1 --config=configs/default.py --workdir=/shared/runs/x \
#       [--repo_dir=DIR] [--venv=DIR] [--port=61000] [--dry_run] \
#       [-- --config.model.num_hidden_layers=12 --config.mesh.fsdp=8]
#
# Every host needs the checkout at --repo_dir (default: this checkout's path) with its venv
# (`pip install -e '.[cuda]'`), passwordless ssh, and the workdir on a filesystem all hosts share.
# The first host is process 0 and runs the coordinator. Relaunching the same command resumes.
set -euo pipefail

usage() {
  sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
  exit "${1:-2}"
}
die() { echo "gpu_multinode.sh: $*" >&2; exit 2; }

HOSTS="" CONFIG="" WORKDIR="" REPO_DIR="$(cd "$(dirname "$0")/.." && pwd)" VENV="" PORT=61000
DRY_RUN=0 EXTRA=()
while (($#)); do
  case "$1" in
    --hosts=*) HOSTS="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --repo_dir=*) REPO_DIR="${1#*=}" ;;
    --venv=*) VENV="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --dry_run) DRY_RUN=1 ;;
    -h|--help) usage 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) echo "gpu_multinode.sh: unknown argument: $1" >&2; usage ;;
  esac
  shift
done
[[ -n "$HOSTS" ]] || die "--hosts=HOST0,HOST1,... is required (HOST0 runs the coordinator)"
[[ -n "$CONFIG" ]] || die "--config is required (see --help)"
[[ -n "$WORKDIR" ]] || die "--workdir is required (a directory shared by all hosts)"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a number"
IFS=, read -r -a HOST_LIST <<<"$HOSTS"
N=${#HOST_LIST[@]}
PYTHON="${VENV:-$REPO_DIR/.venv}/bin/python"

# main.py passes these to jax.distributed.initialize(); every host's GPUs stay its local devices.
remote_command() {
  local i=$1 cmd arg
  cmd="cd $(printf '%q' "$REPO_DIR") && exec $(printf '%q' "$PYTHON") -m cotlab_jax.main"
  cmd+=" --coordinator_address=${HOST_LIST[0]}:$PORT --num_processes=$N --process_id=$i"
  cmd+=" --config=$(printf '%q' "$CONFIG") --workdir=$(printf '%q' "$WORKDIR")"
  for arg in "${EXTRA[@]}"; do cmd+=" $(printf '%q' "$arg")"; done
  echo "$cmd"
}

# -tt: closing the connection (Ctrl-C here, or another host failing) hangs up the remote process.
for i in "${!HOST_LIST[@]}"; do
  echo "[$((i + 1))] ssh -tt ${HOST_LIST[i]} '$(remote_command "$i")'"
done
((DRY_RUN)) && exit 0

PIDS=()
for i in "${!HOST_LIST[@]}"; do
  host="${HOST_LIST[i]}"
  ssh -tt -o BatchMode=yes "$host" "$(remote_command "$i")" </dev/null \
    > >(sed -u "s/^/[$host] /") 2>&1 &
  PIDS+=($!)
done
# One process failing leaves the others waiting on it forever: stop them all.
stop_all() { kill "${PIDS[@]}" 2>/dev/null || true; }
trap stop_all INT TERM
for _ in "${PIDS[@]}"; do
  if ! wait -n "${PIDS[@]}"; then
    stop_all
    die "a host failed; relaunch the same command to resume from $WORKDIR"
  fi
done
