#!/usr/bin/env bash
# Decoupled specialists: one SLURM array task per modality (image, video, document, audio), each a multi-GPU
# (multi-node) fit of configs/specialist/<modality>.yaml from the base θ₀.
#
#   sbatch slurm/specialist.sh                            # all four, resources from the #SBATCH lines below
#   sbatch --array=3 slurm/specialist.sh                  # the audio specialist only (0 image, 1 video,
#                                                         # 2 document, 3 audio)
#   OMNI_NODES=2 OMNI_GPUS_PER_NODE=8 OMNI_PARTITION=gpu slurm/specialist.sh     # submits itself with those
#   slurm/specialist.sh --trainer.precision bf16-mixed --trainer.max_steps 2000   # fit overrides (all tasks)
#
# Settings (environment) and their defaults: slurm/common.sh — OMNI_OUT [runs/demo], OMNI_BASE
# [$OMNI_OUT/base], OMNI_DATA [$OMNI_OUT/data], OMNI_CONFIG_DIR [configs/specialist], OMNI_PARTITION,
# OMNI_ACCOUNT, OMNI_QOS [cluster defaults], OMNI_NODES [1], OMNI_GPUS_PER_NODE [8], OMNI_CPUS_PER_TASK [8],
# OMNI_MEM [0: whole node], OMNI_TIME [24:00:00], OMNI_STRATEGY [DDP], OMNI_WANDB [1].
# Writes $OMNI_OUT/specialists/<modality>/ (a dense model directory).
# Multi-node DDP by default (one task per GPU, --trainer.devices/num_nodes from SLURM_NTASKS_PER_NODE/SLURM_NNODES);
# Another strategy: OMNI_STRATEGY or --trainer.strategy. Preemption: see slurm/common.sh.
#SBATCH --job-name=omni-specialist
#SBATCH --array=0-3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%A_%a.out
set -euo pipefail
OMNI_REPO="${OMNI_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
[[ -f "${OMNI_REPO}/slurm/common.sh" ]] || { echo "run from the omni-lightning repository root (or set OMNI_REPO)" >&2; exit 2; }
export OMNI_REPO
# shellcheck source=slurm/common.sh
source "${OMNI_REPO}/slurm/common.sh"
omni_defaults
omni_job train specialist.sh "$@"

MODALITIES=(image video document audio)
task="${SLURM_ARRAY_TASK_ID:-}"
[[ "${task}" =~ ^[0-3]$ ]] || omni_die "SLURM_ARRAY_TASK_ID=${task:-unset}: submit as an array (--array=0-3; 0 image," \
  "1 video, 2 document, 3 audio)"
modality="${MODALITIES[${task}]}"
omni_fit "specialist-${modality}" specialist "${OMNI_CONFIG_DIR:-${OMNI_REPO}/configs/specialist}/${modality}.yaml" \
  "${OMNI_BASE}" "${OMNI_OUT}/specialists/${modality}" "$@"
