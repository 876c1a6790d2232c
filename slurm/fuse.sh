#!/usr/bin/env bash
# Decoupled Specialist Fusion on one SLURM CPU node (configs/fuse.yaml; streaming, no GPU):
#   sbatch slurm/fuse.sh                                     # $OMNI_OUT/specialists/* + θ₀ -> $OMNI_OUT/fused
#   OMNI_CPU_PARTITION=cpu OMNI_TIME=01:00:00 slurm/fuse.sh  # submits itself with those
#   sbatch slurm/fuse.sh --method ties --density 0.3 --overwrite    # any `omni-lightning fuse` flag (last wins)
#   sbatch slurm/fuse.sh --base /ckpt/omni-base --specialists /ckpt/s-image /ckpt/s-video /ckpt/s-doc \
#       /ckpt/s-audio --alpha 0.3 0.3 0.3 0.5 --out /ckpt/omni-fused
#
# Settings (environment) and their defaults: slurm/common.sh — OMNI_OUT [runs/demo], OMNI_BASE
# [$OMNI_OUT/base], OMNI_CONFIG [configs/fuse.yaml; FUSE_CONFIG is read too], OMNI_CPU_PARTITION
# [OMNI_PARTITION, else the cluster's default], OMNI_ACCOUNT, OMNI_QOS, OMNI_TIME [04:00:00],
# OMNI_FUSE_IO_THREADS [threads reading + hashing the inputs: the job's CPUs, at most 8], OMNI_WANDB [1: the
# diagnostics are logged as a W&B run of job type fuse, in $OMNI_OUT/logs/fuse].
# Under plain sbatch, sbatch's own input variables override the #SBATCH lines below: SBATCH_PARTITION,
# SBATCH_ACCOUNT, SBATCH_TIMELIMIT, SBATCH_MEM_PER_NODE (memory: fusion streams tensors, peak ≈ 6 × the
# largest tensor in float32 + 0.4 GB; an 8B model needs far less than 64G).
# Fusion is all-or-nothing: the output is renamed into place at the end, and a job killed (time limit,
# preemption: SIGTERM) leaves nothing at the destination; a preempted job is requeued and starts over. No
# --signal: fusion has no checkpoint to save.
#SBATCH --job-name=omni-fuse
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=04:00:00
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
omni_job fuse fuse.sh "$@"

CONFIG="${OMNI_CONFIG:-${FUSE_CONFIG:-${OMNI_REPO}/configs/fuse.yaml}}"
[[ -f "${CONFIG}" ]] || omni_die "config ${CONFIG} not found (set OMNI_CONFIG)"
CPUS="${SLURM_CPUS_PER_TASK:-2}"
IO_THREADS="${OMNI_FUSE_IO_THREADS:-$(( CPUS > 8 ? 8 : CPUS ))}"
args=(--config "${CONFIG}" --progress false --io_threads "${IO_THREADS}"
  --base "${OMNI_BASE}" --specialists "${OMNI_OUT}/specialists/"{image,video,document,audio}
  --out "${OMNI_OUT}/fused")
echo "omni-fuse: config ${CONFIG}, ${IO_THREADS} I/O threads"
# flags given to this script come last, so they override the config and the defaults above
if [[ "${OMNI_WANDB}" == 1 ]]; then
  srun --ntasks=1 --kill-on-bad-exit=1 "${OMNI_PYTHON}" -m omni_lightning jobs fuse \
    --wandb_dir "${OMNI_OUT}/logs/fuse" "${args[@]}" "$@"
else
  srun --ntasks=1 --kill-on-bad-exit=1 "${OMNI_PYTHON}" -m omni_lightning fuse "${args[@]}" "$@"
fi
