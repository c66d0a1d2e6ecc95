#!/usr/bin/env bash
# Run `replay-megatron SUBCOMMAND CONFIG [key=value ...]` on Ascend 910B nodes with MindSpore's msrun
# (for clusters whose scheduler speaks msrun). msrun starts a scheduler and NPUS_PER_NODE workers per node
# and gives each MS_WORKER_NUM, MS_SCHED_HOST, MS_SCHED_PORT, MS_ROLE, RANK_ID, DEVICE_ID; replay_megatron's
# platform layer maps them to torch.distributed's rank, world size and master address.
#
#   launch/msrun_910b.sh train configs/paper/qwen3_4b/topk_moclip.yaml
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 launch/msrun_910b.sh train configs/paper/qwen3_8b/topk_moclip.yaml
#
# Environment: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), MASTER_PORT (8118), NPUS_PER_NODE (8),
# LOG_DIR (msrun_log), CLUSTER_TIME_OUT (600 s), MSRUN (msrun), PYTHON (python, for the plan check),
# DRY_RUN=1, CANN_SET_ENV / ASCEND_TOOLKIT_HOME, and the HCCL variables as in torchrun_910b.sh.
# msrun accepts only `python` (or `python3`) as the program it starts, found on PATH: activate the
# environment that has replay_megatron installed first.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

rm_parse_args "$@"
LOG_DIR=${LOG_DIR:-msrun_log}
CLUSTER_TIME_OUT=${CLUSTER_TIME_OUT:-600}
MSRUN=${MSRUN:-msrun}
rm_ascend_setup 8118
rm_plan "$WORLD" platform.device=npu
rm_launch "$MSRUN" --worker_num="$WORLD" --local_worker_num="$NPUS_PER_NODE" --master_addr="$MASTER_ADDR" \
  --master_port="$MASTER_PORT" --node_rank="$NODE_RANK" --log_dir="$LOG_DIR" --join=True \
  --cluster_time_out="$CLUSTER_TIME_OUT" \
  python -m replay_megatron "$SUBCOMMAND" "$CONFIG" platform.device=npu "${OVERRIDES[@]}" "${REST[@]}"
