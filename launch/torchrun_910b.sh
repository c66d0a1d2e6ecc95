#!/usr/bin/env bash
# Run `replay-megatron SUBCOMMAND CONFIG [key=value ...]` on one or several Ascend 910B nodes with torchrun.
#
#   launch/torchrun_910b.sh train configs/paper/qwen3_4b/topk_moclip.yaml
#   # two nodes: the same command on each, NODE_RANK 0 and 1
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/torchrun_910b.sh train configs/paper/qwen3_8b/topk_moclip.yaml
#
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (29500), NPUS_PER_NODE (8),
# PYTHON (python), TORCHRUN (torchrun), DRY_RUN=1 (print the command only), CANN_SET_ENV or
# ASCEND_TOOLKIT_HOME (where CANN's set_env.sh is). HCCL_CONNECT_TIMEOUT, HCCL_EXEC_TIMEOUT,
# PYTORCH_NPU_ALLOC_CONF and TASK_QUEUE_ENABLE keep values already set. The config is checked with
# `replay-megatron plan` for the whole world (NNODES x NPUS_PER_NODE) before anything starts.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

rm_parse_args "$@"
TORCHRUN=${TORCHRUN:-torchrun}
rm_ascend_setup 29500
rm_plan "$WORLD" platform.device=npu
rm_launch "$TORCHRUN" --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m replay_megatron "$SUBCOMMAND" "$CONFIG" platform.device=npu "${OVERRIDES[@]}" "${REST[@]}"
