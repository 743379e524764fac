#!/usr/bin/env bash
# Cloud TPU VM / queued resource lifecycle for jaxssl: create, install, train, logs, stop, delete.
# Run `launch/tpu.sh --help`; `--dry-run` prints the exact gcloud commands instead of running them.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh COMMAND --name NAME --zone ZONE [options] [-- jaxssl.main arguments]

Commands:
  create    create the TPU VM (or a queued resource with --queued and wait until it is ACTIVE)
  install   put this code on every worker (copy of the working tree, or --git URL) and pip install it
  train     start `python3 -m jaxssl.main --distributed=auto` on every worker in the background
  logs      stream a worker's training log (--worker, default 0: the worker that prints progress)
  stop      send SIGTERM to the run on every worker (it saves a checkpoint and exits)
  status    describe the TPU VM (or queued resource)
  delete    delete the TPU VM (or queued resource)
  all       create, install, train, then logs

Options:
  --name NAME               TPU VM name (also the queued resource id)            [required]
  --zone ZONE               e.g. us-central2-b, us-east5-a                       [required]
  --project PROJECT         GCP project (default: gcloud's configured project)
  --accelerator-type TYPE   v4-8 ... v4-4096, v5litepod-N (or v5e-N), v5p-N, v6e-N [create]
  --version VERSION         TPU runtime version (default by generation: v4 tpu-ubuntu2204-base,
                            v5e v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
  --queued                  use a queued resource (waits for capacity) instead of `tpu-vm create`
  --spot                    Spot capacity (preemptible; jaxssl checkpoints on SIGTERM and resumes)
  --git URL                 install from a git URL (cloned on each worker) instead of copying this tree
  --ref REF                 branch or tag for --git (default: main)
  --extras LIST             pip extras of jaxssl to install (default: video,gcs)
  --python PYTHON           python on the workers (default: python3; e.g. a venv's bin/python)
  --setup CMD               shell command run on every worker after installing (repeatable),
                            e.g. mounting a bucket of videos with gcsfuse
  --config SPEC             config file[:args] (default: configs/videomae_v2.py:variant=B)
  --workdir gs://BUCKET/RUN checkpoints, metrics, summaries; must be gs:// so every worker shares it [train]
  --env KEY=VALUE           environment variable for the training processes (repeatable)
  --worker N|all            worker for `logs` (default: 0)
  --dry-run                 print the commands instead of running them
  -h, --help                this help

Everything after `--` goes to jaxssl.main, e.g. -- --config.input.list_file=/mnt/videos/train.csv

Example:
  launch/tpu.sh all --name vmae --zone us-east5-a --accelerator-type v5p-64 --queued --spot \
      --config configs/videomae_v2.py:variant=L --workdir gs://my-bucket/vmae_l
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

# Quotes one argument for a POSIX shell, only when needed (so dry-run output is exact and copy-pastable).
quote() {
  local s=$1
  if [[ $s =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local out='' arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}

# Runs a command, or prints it with --dry-run.
run() {
  if ((DRY_RUN)); then
    quote_all "$@"
    echo
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

COMMAND=${1:-}
case $COMMAND in
  -h | --help | help | '')
    usage
    exit 0
    ;;
  create | install | train | logs | stop | status | delete | all) shift ;;
  *) die "unknown command '$COMMAND' (create, install, train, logs, stop, status, delete, all; see --help)" ;;
esac

NAME='' ZONE='' PROJECT='' ACCELERATOR='' VERSION='' GIT_URL='' REF='main' EXTRAS='video,gcs' PYTHON='python3'
CONFIG='configs/videomae_v2.py:variant=B' WORKDIR='' WORKER='0'
QUEUED=0 SPOT=0 DRY_RUN=0
SETUP=() ENVS=() TRAIN_ARGS=()

need_value() {
  [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR=$2; shift 2 ;;
    --version) need_value "$@"; VERSION=$2; shift 2 ;;
    --git) need_value "$@"; GIT_URL=$2; shift 2 ;;
    --ref) need_value "$@"; REF=$2; shift 2 ;;
    --extras) need_value "$@"; EXTRAS=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --setup) need_value "$@"; SETUP+=("$2"); shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --env) need_value "$@"; ENVS+=("$2"); shift 2 ;;
    --worker) need_value "$@"; WORKER=$2; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (see --help; arguments for jaxssl.main go after --)" ;;
  esac
done

[[ -n $NAME ]] || die '--name is required'
[[ -n $ZONE ]] || die '--zone is required'
[[ $WORKER == all || $WORKER =~ ^[0-9]+$ ]] || die "--worker must be a number or 'all', not '$WORKER'"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, not '$kv'"
done

# v5e's gcloud name is v5litepod-N; accept v5e-N too.
if [[ $ACCELERATOR =~ ^v5e-([0-9]+)$ ]]; then
  ACCELERATOR="v5litepod-${BASH_REMATCH[1]}"
fi

default_version() {
  case $1 in
    v4-*) echo 'tpu-ubuntu2204-base' ;;
    v5litepod-*) echo 'v2-alpha-tpuv5-lite' ;;
    v5p-*) echo 'v2-alpha-tpuv5' ;;
    v6e-*) echo 'v2-alpha-tpuv6e' ;;
    *) return 1 ;;
  esac
}

GCLOUD_WHERE=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then
  GCLOUD_WHERE+=("--project=$PROJECT")
fi
TPU_VM=(gcloud compute tpus tpu-vm)
QUEUED_RESOURCES=(gcloud compute tpus queued-resources)

# Runs a shell command on workers over ssh: ssh_workers WORKER COMMAND.
ssh_workers() {
  run "${TPU_VM[@]}" ssh "$NAME" "${GCLOUD_WHERE[@]}" "--worker=$1" "--command=$2"
}

# Paths on the workers, expanded by their shell.
REMOTE_DIR="\$HOME/jaxssl"
LOG="\$HOME/jaxssl-train.log"
PID="\$HOME/jaxssl-train.pid"
TARBALL_REMOTE='jaxssl-src.tar.gz' # scp puts relative paths in the home directory

do_create() {
  [[ $ACCELERATOR =~ ^(v4|v5litepod|v5p|v6e)-[0-9]+$ ]] ||
    die "--accelerator-type must be v4-N, v5litepod-N (v5e-N), v5p-N or v6e-N, not '${ACCELERATOR:-(none)}'"
  local version=$VERSION
  if [[ -z $version ]]; then
    version=$(default_version "$ACCELERATOR")
  fi
  local spot=()
  if ((SPOT)); then
    spot=(--spot)
  fi
  if ((QUEUED)); then
    run "${QUEUED_RESOURCES[@]}" create "$NAME" "--node-id=$NAME" "${GCLOUD_WHERE[@]}" \
      "--accelerator-type=$ACCELERATOR" "--runtime-version=$version" ${spot[@]+"${spot[@]}"}
    wait_active
  else
    run "${TPU_VM[@]}" create "$NAME" "${GCLOUD_WHERE[@]}" "--accelerator-type=$ACCELERATOR" \
      "--version=$version" ${spot[@]+"${spot[@]}"}
  fi
}

wait_active() {
  local describe=("${QUEUED_RESOURCES[@]}" describe "$NAME" "${GCLOUD_WHERE[@]}" '--format=value(state.state)')
  if ((DRY_RUN)); then
    echo "# then poll until the state is ACTIVE:"
    run "${describe[@]}"
    return
  fi
  local state=''
  while true; do
    state=$("${describe[@]}")
    echo "queued resource $NAME: $state" >&2
    case $state in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED) die "queued resource $NAME is $state (see: ${QUEUED_RESOURCES[*]} describe $NAME)" ;;
    esac
    sleep 30
  done
}

# The working tree as a tarball: tracked files and untracked ones that git does not ignore (no .venv, no runs/).
make_tarball() {
  local root tarball=$1 pipeline
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  if git -C "$root" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    pipeline="git -C $(quote "$root") ls-files -z --cached --others --exclude-standard"
    pipeline+=" | tar -C $(quote "$root") --null -T - -czf $(quote "$tarball")"
  else
    pipeline="tar -C $(quote "$root") --exclude=.git --exclude=.venv --exclude=.venv-ci --exclude=runs"
    pipeline+=" --exclude=__pycache__ -czf $(quote "$tarball") ."
  fi
  if ((DRY_RUN)); then
    echo "$pipeline"
  else
    echo "+ $pipeline" >&2
    bash -o pipefail -c "$pipeline"
  fi
}

pip_install() {
  local pip=("$PYTHON" -m pip install -q)
  printf '%s && %s' "$(quote_all "${pip[@]}" -U pip)" "$(quote_all "${pip[@]}" 'jax[tpu]' -e ".[$EXTRAS]")"
}

do_install() {
  local remote
  if [[ -n $GIT_URL ]]; then
    remote="rm -rf $REMOTE_DIR && git clone --depth 1 --branch $(quote "$REF") $(quote "$GIT_URL") $REMOTE_DIR"
  else
    local tarball
    tarball="${TMPDIR:-/tmp}/jaxssl-src-$NAME.tar.gz"
    make_tarball "$tarball"
    run "${TPU_VM[@]}" scp "$tarball" "$NAME:$TARBALL_REMOTE" "${GCLOUD_WHERE[@]}" --worker=all
    remote="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf $TARBALL_REMOTE -C $REMOTE_DIR"
  fi
  remote+=" && cd $REMOTE_DIR && $(pip_install)"
  local cmd
  for cmd in ${SETUP[@]+"${SETUP[@]}"}; do
    remote+=" && $cmd"
  done
  ssh_workers all "$remote"
}

do_train() {
  [[ $WORKDIR == gs://* ]] ||
    die "--workdir must be a gs:// path shared by all workers (e.g. gs://my-bucket/run1), not '${WORKDIR:-(none)}'"
  local main=("$PYTHON" -m jaxssl.main "--config=$CONFIG" "--workdir=$WORKDIR" --distributed=auto)
  main+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  local envs=''
  if [[ ${#ENVS[@]} -gt 0 ]]; then
    envs="env $(quote_all "${ENVS[@]}") "
  fi
  # A second start while a run is alive is refused; setsid + nohup keep the run going after ssh returns.
  local remote="cd $REMOTE_DIR && if [ -f $PID ] && kill -0 \"\$(cat $PID)\" 2>/dev/null; then"
  remote+=" echo \"jaxssl is already running on \$(hostname) (pid \$(cat $PID))\" >&2; exit 1; fi"
  remote+=" && (${envs}setsid nohup $(quote_all "${main[@]}") > $LOG 2>&1 < /dev/null & echo \$! > $PID)"
  remote+=" && echo \"started on \$(hostname): pid \$(cat $PID), log $LOG\""
  ssh_workers all "$remote"
}

do_logs() {
  ssh_workers "$WORKER" "tail -n +1 -F $LOG"
}

do_stop() {
  ssh_workers all "if [ -f $PID ]; then kill -TERM \"\$(cat $PID)\" 2>/dev/null && echo \"SIGTERM sent on \$(hostname)\"; fi; true"
}

do_status() {
  if ((QUEUED)); then
    run "${QUEUED_RESOURCES[@]}" describe "$NAME" "${GCLOUD_WHERE[@]}"
  else
    run "${TPU_VM[@]}" describe "$NAME" "${GCLOUD_WHERE[@]}"
  fi
}

do_delete() {
  if ((QUEUED)); then
    run "${QUEUED_RESOURCES[@]}" delete "$NAME" "${GCLOUD_WHERE[@]}" --force --quiet
  else
    run "${TPU_VM[@]}" delete "$NAME" "${GCLOUD_WHERE[@]}" --quiet
  fi
}

case $COMMAND in
  create) do_create ;;
  install) do_install ;;
  train) do_train ;;
  logs) do_logs ;;
  stop) do_stop ;;
  status) do_status ;;
  delete) do_delete ;;
  all)
    [[ $WORKDIR == gs://* ]] || die "--workdir must be a gs:// path shared by all workers, not '${WORKDIR:-(none)}'"
    do_create
    do_install
    do_train
    do_logs
    ;;
esac
