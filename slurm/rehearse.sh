#!/usr/bin/env bash
# Balanced multi-modal rehearsal: LoRA on the backbone over all four modalities (configs/rehearse.yaml).
#
#   sbatch slurm/rehearse.sh                                   # resources from the #SBATCH lines below
#   OMNI_NODES=4 slurm/rehearse.sh --trainer.max_steps 2000    # submits itself; fit overrides
#
# Settings (environment) and their defaults: slurm/common.sh — OMNI_OUT [runs/demo], OMNI_DATA
# [$OMNI_OUT/data], OMNI_CONFIG [configs/rehearse.yaml], OMNI_PARTITION, OMNI_ACCOUNT, OMNI_QOS [cluster
# defaults], OMNI_NODES [1], OMNI_GPUS_PER_NODE [8], OMNI_CPUS_PER_TASK [8], OMNI_MEM [0], OMNI_TIME
# [24:00:00], OMNI_STRATEGY [with several tasks ddp_find_unused_parameters_true: a step of one modality leaves
# other parts' LoRA unused], OMNI_WANDB [1].
# Reads $OMNI_OUT/recovered, writes $OMNI_OUT/final. Preemption: see slurm/common.sh.
#SBATCH --job-name=omni-rehearse
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --mem=0
#SBATCH --time=24:00:00
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
omni_job train rehearse.sh "$@"
if [[ -z "${OMNI_STRATEGY:-}" && $(( ${SLURM_NNODES:-1} * ${SLURM_NTASKS_PER_NODE:-1} )) -gt 1 ]]; then
  export OMNI_STRATEGY=ddp_find_unused_parameters_true  # DDP, but a step of one modality leaves some LoRA unused
fi

omni_fit rehearse rehearse "${OMNI_CONFIG:-${OMNI_REPO}/configs/rehearse.yaml}" "${OMNI_OUT}/recovered" "${OMNI_OUT}/final" "$@"
