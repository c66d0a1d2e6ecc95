#!/usr/bin/env bash
# Run `replay-megatron SUBCOMMAND CONFIG [key=value ...]` on NPROC CPU processes (gloo) with torchrun:
# the same code path as a 910B launch, for tests, the demo and debugging without accelerators.
#
#   NPROC=2 launch/cpu_gloo.sh train configs/cpu/tiny_tp2pp1.yaml run.data_root=/tmp/tiny
#
# Environment: NPROC (2), MASTER_PORT (29511), OMP_NUM_THREADS (1), PYTHON (python), TORCHRUN (torchrun),
# DRY_RUN=1 (print the command only). platform.device=cpu is passed before your overrides.
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=launch/common.sh
source "$HERE/common.sh"

rm_parse_args "$@"
NPROC=${NPROC:-2}
MASTER_PORT=${MASTER_PORT:-29511}
TORCHRUN=${TORCHRUN:-torchrun}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rm_show_env OMP_NUM_THREADS

rm_plan "$NPROC" platform.device=cpu
rm_launch "$TORCHRUN" --nnodes 1 --nproc-per-node "$NPROC" --master-addr 127.0.0.1 --master-port "$MASTER_PORT" \
  -m replay_megatron "$SUBCOMMAND" "$CONFIG" platform.device=cpu "${OVERRIDES[@]}" "${REST[@]}"
