#!/usr/bin/env bash
# Projector Recovery: re-fit the audio projector to the fused backbone (configs/recover.yaml), multi-GPU.
#
#   sbatch slurm/recover.sh                                   # resources from the #SBATCH lines below
#   OMNI_GPUS_PER_NODE=4 OMNI_TIME=02:00:00 slurm/recover.sh  # submits itself with those
#   slurm/recover.sh --trainer.max_steps 1000                 # fit overrides
#
# Settings (environment) and their defaults: slurm/common.sh — OMNI_OUT [runs/demo], OMNI_DATA
# [$OMNI_OUT/data], OMNI_CONFIG [configs/recover.yaml], OMNI_PARTITION, OMNI_ACCOUNT, OMNI_QOS [cluster
# defaults], OMNI_NODES [1], OMNI_GPUS_PER_NODE [8], OMNI_CPUS_PER_TASK [8], OMNI_MEM [0], OMNI_TIME
# [08:00:00], OMNI_STRATEGY [DDP], OMNI_WANDB [1].
# Reads $OMNI_OUT/fused, writes $OMNI_OUT/recovered. Preemption: see slurm/common.sh.
#SBATCH --job-name=omni-recover
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=08:00:00
#SBATCH --signal=SIGUSR1@90
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
OMNI_REPO="${OMNI_REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}"
[[ -f "${OMNI_REPO}/slurm/common.sh" ]] || { echo "run from the omni-lightning repository root (or set OMNI_REPO)" >&2; exit 2; }
export OMNI_REPO
# shellcheck source=slurm/common.sh
source "${OMNI_REPO}/slurm/common.sh"
omni_defaults
omni_job train recover.sh "$@"

omni_fit recover recover "${OMNI_CONFIG:-${OMNI_REPO}/configs/recover.yaml}" "${OMNI_OUT}/fused" "${OMNI_OUT}/recovered" "$@"
