# shellcheck shell=bash
# shellcheck disable=SC2034  # variables set here are read by the sourcing launch script
# Shared by the launch scripts (sourced, never run): argument split, the `plan` check before a launch,
# the Ascend environment, and DRY_RUN=1 (print the command instead of starting it).

PYTHON=${PYTHON:-python}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

rm_usage() {
  echo "usage: $(basename "$0") SUBCOMMAND CONFIG [key=value ...] [--subcommand-option ...]" >&2
  exit 2
}

# rm_parse_args "$@": SUBCOMMAND, CONFIG, OVERRIDES (the key=value arguments) and REST (everything else
# after CONFIG, in order: the subcommand's own options). Overrides are passed before REST so that argparse
# sees them together; an option's value must therefore not contain '=' unless written --option=value.
rm_parse_args() {
  [ $# -ge 2 ] || rm_usage
  SUBCOMMAND=$1
  CONFIG=$2
  shift 2
  OVERRIDES=()
  REST=()
  local arg
  for arg in "$@"; do
    case $arg in
      -*) REST+=("$arg") ;;
      *=*) OVERRIDES+=("$arg") ;;
      *) REST+=("$arg") ;;
    esac
  done
}

# rm_plan WORLD [override ...]: validate the config and print its layout and memory for WORLD ranks;
# exits before anything is launched when the config is invalid.
rm_plan() {
  local world=$1
  shift
  echo "== replay-megatron plan (world size $world)"
  if ! "$PYTHON" -m replay_megatron plan --world-size "$world" "$CONFIG" "$@" "${OVERRIDES[@]}"; then
    echo "== config check failed: not launching" >&2
    exit 2
  fi
}

# rm_ascend_setup DEFAULT_MASTER_PORT: the node variables of a 910B launch with their defaults (NNODES 1,
# NODE_RANK 0, MASTER_ADDR 127.0.0.1, MASTER_PORT, NPUS_PER_NODE 8), WORLD, CANN and the HCCL environment.
rm_ascend_setup() {
  NNODES=${NNODES:-1}
  NODE_RANK=${NODE_RANK:-0}
  MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
  MASTER_PORT=${MASTER_PORT:-$1}
  NPUS_PER_NODE=${NPUS_PER_NODE:-8}
  WORLD=$((NNODES * NPUS_PER_NODE))
  rm_source_cann
  rm_ascend_env
}

# rm_source_cann: source CANN's set_env.sh (CANN_SET_ENV, else under ASCEND_TOOLKIT_HOME, else the default
# install path) when present.
rm_source_cann() {
  local f
  for f in "${CANN_SET_ENV:-}" \
           "${ASCEND_TOOLKIT_HOME:+$ASCEND_TOOLKIT_HOME/set_env.sh}" \
           "${ASCEND_TOOLKIT_HOME:+$ASCEND_TOOLKIT_HOME/../set_env.sh}" \
           /usr/local/Ascend/ascend-toolkit/set_env.sh; do
    if [ -n "$f" ] && [ -f "$f" ]; then
      echo "== CANN: sourcing $f"
      set +u  # set_env.sh reads variables that may be unset
      # shellcheck disable=SC1090
      source "$f"
      set -u
      return 0
    fi
  done
  echo "== CANN: no set_env.sh found (set ASCEND_TOOLKIT_HOME or CANN_SET_ENV); using the current environment"
}

# rm_ascend_env: the HCCL / torch_npu settings MindSpeed users know; values already set are kept, except
# CUDA_DEVICE_MAX_CONNECTIONS, which megatron needs at 1 (communication kernels keep their issue order).
rm_ascend_env() {
  export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
  export HCCL_EXEC_TIMEOUT=${HCCL_EXEC_TIMEOUT:-1200}
  export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
  export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-2}
  export CUDA_DEVICE_MAX_CONNECTIONS=1
  rm_show_env HCCL_CONNECT_TIMEOUT HCCL_EXEC_TIMEOUT PYTORCH_NPU_ALLOC_CONF TASK_QUEUE_ENABLE \
              CUDA_DEVICE_MAX_CONNECTIONS
}

rm_show_env() {
  local name
  for name in "$@"; do
    echo "== env: $name=${!name}"
  done
}

# rm_launch CMD...: print the command, then run it in place of this shell (DRY_RUN=1: only print it).
rm_launch() {
  printf '== launch:'
  printf ' %q' "$@"
  printf '\n'
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "== DRY_RUN=1: not started"
    return 0
  fi
  exec "$@"
}
