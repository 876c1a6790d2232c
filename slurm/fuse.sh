#!/usr/bin/env bash
# Decoupled Specialist Fusion on one SLURM CPU node:
#   sbatch slurm/fuse.sh                                   # configs/fuse.yaml as shipped (the make-demo layout)
#   sbatch slurm/fuse.sh --base /ckpt/omni-base --specialists /ckpt/s-image /ckpt/s-video /ckpt/s-doc \
#       /ckpt/s-audio --alpha 0.3 0.3 0.3 0.5 --out /ckpt/omni-fused      # any `omni-lightning fuse` flag
#
# Resources. The #SBATCH lines below are the defaults; sbatch's own input environment variables override
# them without editing this file (and sbatch command-line flags override both):
#   SBATCH_PARTITION     partition               default: the cluster's default partition (no line below)
#   SBATCH_ACCOUNT       account to charge       default: your default account (no line below)
#   SBATCH_TIMELIMIT     wall-clock limit        default: 04:00:00
#   SBATCH_MEM_PER_NODE  memory                  default: 64G (fusion streams tensors: peak ≈ 6 × the largest
#                                                tensor in float32 + 0.4 GB; an 8B model needs far less than 64G)
# e.g.  SBATCH_PARTITION=cpu SBATCH_ACCOUNT=myproj SBATCH_TIMELIMIT=01:00:00 sbatch slurm/fuse.sh
# Script settings (environment): FUSE_CONFIG (default configs/fuse.yaml), PYTHON (default .venv/bin/python
# when it exists, else python3), FUSE_IO_THREADS (threads reading + hashing the inputs; default: the CPUs of
# the job, at most 8). The job runs in the submission directory; run sbatch from the repository.
# Fusion is all-or-nothing: the output is renamed into place at the end, and a job killed at its time limit
# (SIGTERM) leaves nothing at the destination; just resubmit.
#SBATCH --job-name=omni-fuse
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
set -euo pipefail

CONFIG="${FUSE_CONFIG:-configs/fuse.yaml}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
CPUS="${SLURM_CPUS_PER_TASK:-2}"
IO_THREADS="${FUSE_IO_THREADS:-$(( CPUS > 8 ? 8 : CPUS ))}"
# srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05)
export SRUN_CPUS_PER_TASK="${CPUS}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

echo "omni-fuse: job ${SLURM_JOB_ID:-local} on $(hostname), config ${CONFIG}, ${IO_THREADS} I/O threads"
# flags given to this script come last, so they override the config and the defaults above
srun --ntasks=1 --kill-on-bad-exit=1 "${PYTHON}" -m omni_lightning fuse --config "${CONFIG}" --no-progress \
  --set "io_threads=${IO_THREADS}" "$@"
