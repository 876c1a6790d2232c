#!/usr/bin/env bash
# Evaluation of every model of the pipeline on every modality's eval split, one GPU:
#   θ₀ ($OMNI_BASE), $OMNI_OUT/specialists/{image,video,document,audio}, fused, recovered, final (those present).
#   sbatch slurm/eval.sh                                   # resources from the #SBATCH lines below
#   OMNI_EVAL_MODELS="runs/demo/final" slurm/eval.sh       # submits itself; only these models
#   sbatch slurm/eval.sh --max-samples 1000 --pool-size 100    # `omni-lightning eval` flags
#   OMNI_EVAL_MTEB="MAEB(beta)" sbatch slurm/eval.sh           # mteb instead: a benchmark ...
#   OMNI_EVAL_MTEB_TASKS="ClothoT2ARetrieval.v2" sbatch slurm/eval.sh --batch-size 16   # ... or tasks
#
# With OMNI_EVAL_MTEB (an mteb benchmark name) or OMNI_EVAL_MTEB_TASKS (mteb task names, space-separated) set,
# each model runs `omni-lightning mteb` instead, offline from the node's datasets cache (HF_HOME), into
# $OMNI_OUT/mteb/<model> (mteb's results/ and summary.{md,json}); extra flags go to `omni-lightning mteb`.
#
# Writes $OMNI_OUT/eval/<model>.json (`omni-lightning eval --out`); with OMNI_WANDB=1 (default) each model is
# also a W&B run of job type eval ($OMNI_OUT/logs/eval): <phase>/eval/<metric>/<modality> and a table of
# retrieval examples <phase>/eval/examples (OMNI_EVAL_EXAMPLES queries per modality [8]).
# Settings (environment) and their defaults: slurm/common.sh — OMNI_OUT [runs/demo], OMNI_BASE, OMNI_DATA,
# OMNI_EVAL_MODELS [the list above], OMNI_PARTITION, OMNI_ACCOUNT, OMNI_QOS, OMNI_CPUS_PER_TASK [8],
# OMNI_TIME [04:00:00]. Evaluation is not resumable: a preempted job is requeued and starts over (no --signal).
#SBATCH --job-name=omni-eval
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
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
omni_job eval eval.sh "$@"

models=()
if [[ -n "${OMNI_EVAL_MODELS:-}" ]]; then
  read -r -a models <<< "${OMNI_EVAL_MODELS}"
  for m in "${models[@]}"; do omni_need_model "OMNI_EVAL_MODELS entry" "${m}"; done
else
  for m in "${OMNI_BASE}" "${OMNI_OUT}/specialists/"{image,video,document,audio} "${OMNI_OUT}/"{fused,recovered,final}; do
    if [[ -f "${m}/omni_config.json" ]]; then models+=("${m}"); else echo "omni-eval: skipping ${m} (no model there)"; fi
  done
fi
[[ ${#models[@]} -gt 0 ]] || omni_die "no model to evaluate under ${OMNI_OUT} (set OMNI_EVAL_MODELS)"
if [[ -n "${OMNI_EVAL_MTEB:-}" || -n "${OMNI_EVAL_MTEB_TASKS:-}" ]]; then
  select_=(--benchmark "${OMNI_EVAL_MTEB:-}")
  if [[ -n "${OMNI_EVAL_MTEB_TASKS:-}" ]]; then
    [[ -z "${OMNI_EVAL_MTEB:-}" ]] || omni_die "set OMNI_EVAL_MTEB or OMNI_EVAL_MTEB_TASKS, not both"
    read -r -a tasks <<< "${OMNI_EVAL_MTEB_TASKS}"
    select_=(--tasks "${tasks[@]}")
  fi
  echo "omni-eval: mteb (${OMNI_EVAL_MTEB:-${OMNI_EVAL_MTEB_TASKS}}) on ${#models[@]} model(s)"
  status=0
  for m in "${models[@]}"; do
    name="${m#"${OMNI_OUT}/"}"
    [[ "${name}" != "${m}" ]] || name="$(basename "${m}")"
    srun --ntasks=1 --kill-on-bad-exit=1 "${OMNI_PYTHON}" -m omni_lightning mteb --model "${m}" \
      --out "${OMNI_OUT}/mteb/${name//\//-}" --progress false "${select_[@]}" "$@" || status=$?
  done
  exit "${status}"
fi
[[ -d "${OMNI_DATA}" ]] || omni_die "OMNI_DATA=${OMNI_DATA} does not exist: point it at a dataset root"
wandb=(--wandb_dir "${OMNI_OUT}/logs/eval" --examples "${OMNI_EVAL_EXAMPLES:-8}")
if [[ "${OMNI_WANDB}" != 1 ]]; then wandb=(--wandb false); fi
echo "omni-eval: ${#models[@]} model(s) on ${OMNI_DATA}"
srun --ntasks=1 --kill-on-bad-exit=1 "${OMNI_PYTHON}" -m omni_lightning jobs eval --data "${OMNI_DATA}" \
  --out "${OMNI_OUT}/eval" "${wandb[@]}" --progress false --models "${models[@]}" "$@"
