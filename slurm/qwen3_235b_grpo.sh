#!/usr/bin/env bash
#SBATCH --job-name=qwen3-235b-grpo
#SBATCH --nodes=16
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
#
# GRPO on Qwen3-235B-A22B (configs/qwen3_235b_a22b_grpo.yaml) across a Slurm allocation: a Ray
# cluster over all nodes, then the trainer on the first node. Submit from the repository root:
#
#   sbatch slurm/qwen3_235b_grpo.sh [extra overrides, e.g. --model.path=/models/Qwen3-235B-A22B]
#
# Everything of the run (Ray logs, trainer log, checkpoints, TensorBoard) goes under one folder:
# ${RUN_ROOT:-runs}/qwen3_235b_a22b_grpo-<job id>.  Site-specific NCCL settings (NCCL_SOCKET_IFNAME,
# NCCL_IB_HCA, ...) are taken from the environment sbatch was called with.
set -euo pipefail

MEGARL_ROOT="${MEGARL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}"
cd "$MEGARL_ROOT"
# shellcheck source=slurm/ray_cluster.sh
source "$MEGARL_ROOT/slurm/ray_cluster.sh"

CONFIG="${CONFIG:-configs/qwen3_235b_a22b_grpo.yaml}"
EXPERIMENT="${EXPERIMENT:-qwen3_235b_a22b_grpo}"
NNODES="${SLURM_JOB_NUM_NODES:?submit with sbatch (SLURM_JOB_NUM_NODES is not set)}"
GPUS_PER_NODE="${SLURM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
GPUS_PER_NODE="${GPUS_PER_NODE##*:}"  # "h100:8" -> 8
RUN_DIR="${RUN_ROOT:-runs}/${EXPERIMENT}-${SLURM_JOB_ID:-local}"
LOG_DIR="$RUN_DIR/logs"
mkdir -p "$LOG_DIR"

# Megatron overlaps TP/SP communication with compute only with one hardware queue per device.
export CUDA_DEVICE_MAX_CONNECTIONS=1
# NVLink SHARP buffers take GPU memory vLLM and Megatron need; verl's large-MoE recipes turn it off.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export NCCL_TIMEOUT="${NCCL_TIMEOUT:-1800}"
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
export VLLM_USE_V1=1
export RAY_DEDUP_LOGS=0
export PYTHONUNBUFFERED=1
export PYTHONPATH="$MEGARL_ROOT${PYTHONPATH:+:$PYTHONPATH}"

trap ray_cluster_stop EXIT

ray_cluster_start "$GPUS_PER_NODE" "$LOG_DIR"
ray_cluster_wait $((NNODES * GPUS_PER_NODE))

"$PYTHON" launch/train.py --config "$CONFIG" \
    --tp 4 --pp 8 --ep 8 --rollout-tp 16 \
    --nnodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE" \
    --trainer.experiment_name="$EXPERIMENT" --trainer.output_dir="$RUN_DIR" \
    "$@" 2>&1 | tee "$LOG_DIR/train.log"
