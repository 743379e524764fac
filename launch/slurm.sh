#!/usr/bin/env bash
# SLURM GPU-cluster launcher for jaxssl: writes an sbatch script and submits it.
# Run `launch/slurm.sh --help`; `--dry-run` prints the sbatch script and the submit command instead.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/slurm.sh --workdir DIR [options] [-- jaxssl.main arguments]

Writes an sbatch script that starts `srun python -m jaxssl.main ... --distributed=auto` and submits it with sbatch.
Each srun task is one JAX process; jax.distributed.initialize() reads SLURM_JOB_ID, SLURM_STEP_NODELIST,
SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID, which srun sets for every task.

Options:
  --nodes N             nodes (default: 1)
  --gpus-per-node G     GPUs per node (default: 8)
  --per gpu|node        one process per GPU (default; each task sees all of the node's GPUs and JAX picks
                        GPU number SLURM_LOCALID) or one process per node driving all its GPUs
  --cpus-per-task C     CPU cores per task (default: SLURM's; give the input pipeline enough: see docs/scaling.md)
  --mem MEM             memory per node, e.g. 0 (all) or 512G
  --time T              time limit, e.g. 24:00:00
  --partition P         partition
  --account A           account
  --qos Q               quality of service
  --job-name NAME       job name (default: jaxssl)
  --logs DIR            where the sbatch script and the job's output go (default: slurm-logs)
  --config SPEC         config file[:args] (default: configs/videomae_v2.py:variant=B)
  --workdir DIR         checkpoints, metrics, summaries: a shared filesystem path or gs://   [required]
  --python PYTHON       python that has jaxssl installed (default: python)
  --setup CMD           shell line run before srun (repeatable), e.g. 'source .venv/bin/activate'
  --env KEY=VALUE       environment variable for the job (repeatable)
  --port PORT           coordinator port (JAX_COORDINATOR_PORT; default: derived from the job id)
  --signal-seconds S    SIGTERM the tasks S seconds before the time limit so they checkpoint (default: 300)
  --requeue             let SLURM requeue the job after preemption (it resumes from the workdir)
  --sbatch-arg ARG      any other sbatch directive, e.g. --sbatch-arg=--exclusive (repeatable)
  --dry-run             print the sbatch script and the sbatch command instead of running them
  -h, --help            this help

Everything after `--` goes to jaxssl.main, e.g. -- --config.input.list_file=/data/k710_train.csv

Example:
  launch/slurm.sh --nodes 4 --gpus-per-node 8 --time 48:00:00 --partition gpu \
      --setup 'source ~/jaxssl/.venv/bin/activate' \
      --config configs/videomae_v2.py:variant=L --workdir /shared/runs/vmae_l -- --config.input.list_file=...
EOF
}

die() {
  echo "error: $*" >&2
  exit 2
}

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

NODES=1 GPUS=8 PER='gpu' CPUS='' MEM='' TIME='' PARTITION='' ACCOUNT='' QOS='' JOB='jaxssl' LOGS='slurm-logs'
CONFIG='configs/videomae_v2.py:variant=B' WORKDIR='' PYTHON='python' PORT='' SIGNAL_SECONDS=300 REQUEUE=0 DRY_RUN=0
SETUP=() ENVS=() SBATCH_ARGS=() TRAIN_ARGS=()

need_value() {
  [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"
}

while [[ $# -gt 0 ]]; do
  case $1 in
    --nodes) need_value "$@"; NODES=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; GPUS=$2; shift 2 ;;
    --per) need_value "$@"; PER=$2; shift 2 ;;
    --cpus-per-task) need_value "$@"; CPUS=$2; shift 2 ;;
    --mem) need_value "$@"; MEM=$2; shift 2 ;;
    --time) need_value "$@"; TIME=$2; shift 2 ;;
    --partition) need_value "$@"; PARTITION=$2; shift 2 ;;
    --account) need_value "$@"; ACCOUNT=$2; shift 2 ;;
    --qos) need_value "$@"; QOS=$2; shift 2 ;;
    --job-name) need_value "$@"; JOB=$2; shift 2 ;;
    --logs) need_value "$@"; LOGS=$2; shift 2 ;;
    --config) need_value "$@"; CONFIG=$2; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR=$2; shift 2 ;;
    --python) need_value "$@"; PYTHON=$2; shift 2 ;;
    --setup) need_value "$@"; SETUP+=("$2"); shift 2 ;;
    --env) need_value "$@"; ENVS+=("$2"); shift 2 ;;
    --port) need_value "$@"; PORT=$2; shift 2 ;;
    --signal-seconds) need_value "$@"; SIGNAL_SECONDS=$2; shift 2 ;;
    --sbatch-arg) need_value "$@"; SBATCH_ARGS+=("$2"); shift 2 ;;
    --sbatch-arg=*) SBATCH_ARGS+=("${1#--sbatch-arg=}"); shift ;;
    --requeue) REQUEUE=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (see --help; arguments for jaxssl.main go after --)" ;;
  esac
done

[[ -n $WORKDIR ]] || die '--workdir is required (a path every node can reach, or gs://)'
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, not '$NODES'"
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, not '$GPUS'"
[[ $SIGNAL_SECONDS =~ ^[0-9]+$ ]] || die "--signal-seconds must be a number of seconds, not '$SIGNAL_SECONDS'"
[[ -z $CPUS || $CPUS =~ ^[1-9][0-9]*$ ]] || die "--cpus-per-task must be a positive integer, not '$CPUS'"
[[ -z $PORT || $PORT =~ ^[1-9][0-9]*$ ]] || die "--port must be a port number, not '$PORT'"
case $PER in
  gpu) TASKS_PER_NODE=$GPUS ;;
  node) TASKS_PER_NODE=1 ;;
  *) die "--per must be 'gpu' or 'node', not '$PER'" ;;
esac
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env needs KEY=VALUE, not '$kv'"
done
if [[ $WORKDIR != *://* && $WORKDIR != /* ]]; then
  WORKDIR="$PWD/$WORKDIR" # the job may start elsewhere: make it absolute
fi

sbatch_script() {
  echo '#!/bin/bash'
  echo "#SBATCH --job-name=$(quote "$JOB")"
  echo "#SBATCH --nodes=$NODES"
  echo "#SBATCH --ntasks-per-node=$TASKS_PER_NODE"
  echo "#SBATCH --gpus-per-node=$GPUS"
  if [[ -n $CPUS ]]; then echo "#SBATCH --cpus-per-task=$CPUS"; fi
  if [[ -n $MEM ]]; then echo "#SBATCH --mem=$MEM"; fi
  if [[ -n $TIME ]]; then echo "#SBATCH --time=$TIME"; fi
  if [[ -n $PARTITION ]]; then echo "#SBATCH --partition=$PARTITION"; fi
  if [[ -n $ACCOUNT ]]; then echo "#SBATCH --account=$ACCOUNT"; fi
  if [[ -n $QOS ]]; then echo "#SBATCH --qos=$QOS"; fi
  echo "#SBATCH --output=$LOGS_ABS/%x-%j.out"
  if ((SIGNAL_SECONDS > 0)); then echo "#SBATCH --signal=TERM@$SIGNAL_SECONDS"; fi
  if ((REQUEUE)); then echo '#SBATCH --requeue'; fi
  local arg
  for arg in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
    echo "#SBATCH $arg"
  done
  echo
  echo "# Written by launch/slurm.sh: $NODES node(s) x $GPUS GPU(s), one JAX process per $PER."
  echo 'set -eo pipefail' # no -u: module and conda activation scripts read unset variables
  echo "cd $(quote "$SUBMIT_DIR")"
  local line
  for line in ${SETUP[@]+"${SETUP[@]}"}; do
    echo "$line"
  done
  local kv
  for kv in ${ENVS[@]+"${ENVS[@]}"}; do
    echo "export ${kv%%=*}=$(quote "${kv#*=}")"
  done
  if [[ -n $PORT ]]; then echo "export JAX_COORDINATOR_PORT=$PORT"; fi
  if [[ $PER == node ]]; then
    echo '# One process per node drives all its GPUs (jaxssl.distributed gives it every visible GPU).'
  else
    echo '# One process per GPU: every task sees all the node'"'"'s GPUs and JAX takes number SLURM_LOCALID.'
  fi
  local main=("$PYTHON" -m jaxssl.main "--config=$CONFIG" "--workdir=$WORKDIR" --distributed=auto)
  main+=(${TRAIN_ARGS[@]+"${TRAIN_ARGS[@]}"})
  echo "srun --kill-on-bad-exit=1 $(quote_all "${main[@]}")"
}

SUBMIT_DIR=$PWD
if [[ $LOGS == /* ]]; then LOGS_ABS=$LOGS; else LOGS_ABS="$PWD/$LOGS"; fi
SCRIPT="$LOGS_ABS/$JOB.sbatch"

if ((DRY_RUN)); then
  echo "# $SCRIPT"
  sbatch_script
  echo "# submit with:"
  echo "sbatch $(quote "$SCRIPT")"
  exit 0
fi

command -v sbatch >/dev/null || die 'sbatch not found: run this on a SLURM login node (or use --dry-run)'
mkdir -p "$LOGS_ABS"
sbatch_script >"$SCRIPT"
echo "wrote $SCRIPT" >&2
sbatch "$SCRIPT"
