#!/usr/bin/env bash
# The whole recipe on SLURM: submits every phase, chained with --dependency=afterok, and prints the job ids.
#
#   specialists (array: image, video, document, audio) -> fuse -> recover -> rehearse -> eval
#
#   OMNI_OUT=/scratch/me/omni-run1 OMNI_BASE=/ckpt/omni-base OMNI_DATA=/data/shards \
#     OMNI_PARTITION=gpu OMNI_ACCOUNT=myproj OMNI_NODES=2 OMNI_GPUS_PER_NODE=8 slurm/pipeline.sh
#   slurm/pipeline.sh                     # the make-demo layout: runs/demo/{base,data} -> runs/demo/...
#
# Run it on a login node from the directory the jobs should run in (relative paths are relative to it).
# Every job gets the OMNI_* resources as sbatch flags (GPU jobs: partition, account, qos, nodes, GPUs per
# node = tasks per node, CPUs per task, memory, time; fuse: OMNI_CPU_PARTITION, account, qos, time) and runs
# with the same settings; see slurm/common.sh for every variable and default. All runs of one pipeline share
# the W&B group $WANDB_RUN_GROUP [the name of $OMNI_OUT]; fuse is passed --overwrite (a re-run replaces the
# fused model). A job that fails cancels nothing by itself: its dependents stay pending with reason
# DependencyNeverSatisfied (scancel them, fix, resubmit from that phase with the phase's script).
set -euo pipefail
OMNI_REPO="${OMNI_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
export OMNI_REPO
# shellcheck source=slurm/common.sh
source "${OMNI_REPO}/slurm/common.sh"
omni_defaults
[[ -f "${OMNI_BASE}/omni_config.json" ]] || omni_die "OMNI_BASE ${OMNI_BASE} is not an omni-lightning model directory:" \
  "write one with \`omni-lightning init-model --out DIR\` (the tiny default, or --backbone/--audio-encoder local" \
  "checkpoints) and set OMNI_BASE=DIR"
for m in image video document audio; do
  [[ -d "${OMNI_DATA}/${m}/train" && -d "${OMNI_DATA}/${m}/eval" ]] || omni_die "OMNI_DATA=${OMNI_DATA} has no" \
    "${m}/train and ${m}/eval shards (omni-lightning make-demo-data or omni-lightning shard write them)"
done

specialist=$(omni_submit train specialist.sh)
fuse=$(omni_submit fuse fuse.sh "--dependency=afterok:${specialist}" -- --overwrite)
recover=$(omni_submit train recover.sh "--dependency=afterok:${fuse}")
rehearse=$(omni_submit train rehearse.sh "--dependency=afterok:${recover}")
evaluation=$(omni_submit eval eval.sh "--dependency=afterok:${rehearse}")

echo "omni-lightning pipeline ${WANDB_RUN_GROUP}: ${OMNI_BASE} + ${OMNI_DATA} -> ${OMNI_OUT}"
printf '%-11s %s\n' specialist "${specialist}" fuse "${fuse}" recover "${recover}" rehearse "${rehearse}" \
  eval "${evaluation}"
echo "jobs: squeue -u \"\${USER}\"; logs: ${OMNI_OUT}/slurm/; W&B (offline): ${OMNI_OUT}/logs/*/wandb/"
