# shellcheck shell=bash
# Shared by every script in slurm/ (sourced, not run). What the job scripts have in common:
#
# * Two ways to launch a script:
#     sbatch slurm/recover.sh [fit overrides...]   resources from the script's #SBATCH lines; sbatch's own flags
#                                                  (sbatch --nodes 4 ...) and input variables (SBATCH_PARTITION,
#                                                  SBATCH_ACCOUNT, SBATCH_TIMELIMIT, ...) override them
#     slurm/recover.sh [fit overrides...]          outside a job the script submits itself, turning the OMNI_*
#                                                  variables below into sbatch flags, and prints the job id
#   The job runs in the directory it was submitted from: relative paths (OMNI_OUT, ...) are relative to it.
#   sbatch runs a copy of the script, which finds this file as $SLURM_SUBMIT_DIR/slurm/common.sh: submit from
#   the repository root, or set OMNI_REPO to the repository.
#
# * Settings (environment variables; unset = the default in brackets):
#   where things are
#     OMNI_OUT            pipeline folder [runs/demo]: $OMNI_OUT/specialists/<modality>, fused, recovered, final,
#                         eval/ (results), logs/<job>/ (W&B or CSV), lightning/<job>/job-<id>/ (preemption
#                         checkpoints), slurm/ (job logs of self-submitted jobs)
#     OMNI_BASE           the base model directory θ₀ [$OMNI_OUT/base]
#     OMNI_DATA           the dataset root with <modality>/{train,eval}/ shards [$OMNI_OUT/data]
#     OMNI_CONFIG         the phase's config [$OMNI_REPO/configs/<phase>.yaml]; specialists: OMNI_CONFIG_DIR
#                         [$OMNI_REPO/configs/specialist] holding <modality>.yaml
#     OMNI_BIN            the omni-lightning command [$OMNI_REPO/.venv/bin/omni-lightning if present, else on
#                         PATH]; OMNI_PYTHON (or PYTHON) the Python of that installation, likewise
#   resources (turned into sbatch flags when a script submits itself or by slurm/pipeline.sh)
#     OMNI_PARTITION      partition of the GPU jobs [the cluster's default]
#     OMNI_CPU_PARTITION  partition of the fuse job (CPU only) [OMNI_PARTITION]
#     OMNI_ACCOUNT        account to charge [your default]
#     OMNI_QOS            quality of service [the default]
#     OMNI_NODES          nodes per training job [#SBATCH: 1]
#     OMNI_GPUS_PER_NODE  GPUs per node = tasks per node: one task per device [#SBATCH: 8]
#     OMNI_CPUS_PER_TASK  CPUs per task (data workers) [#SBATCH: 8]
#     OMNI_MEM            memory per node [#SBATCH: 0 = all of it]
#     OMNI_TIME           wall-clock limit of each submitted job [#SBATCH of each script]
#   training
#     OMNI_CHECKPOINT_EVERY  save a resumable checkpoint every this many steps (0: only on preemption) [200]
#     OMNI_RESUME         1: a new job of a phase resumes from the newest checkpoint of its earlier jobs that
#                         loads (a job killed by kill -9, OOM or a node failure); 0: start afresh [1]
#     OMNI_OVERWRITE      1: replace the phase's existing output model directory [0: an existing one is an error]
#     OMNI_STRATEGY       Lightning strategy [the config's: DDP across all tasks when there are several];
#                         e.g. ddp_find_unused_parameters_true (rehearsal under DDP); sharded ones (fsdp)
#                         are refused while the fit exports a model directory (see README, SLURM)
#   Weights & Biases
#     OMNI_WANDB          1: log through omni_lightning.loggers.OmniWandbLogger [1]; 0: the config's CSVLogger
#     WANDB_MODE          offline (runs land in $OMNI_OUT/logs/<job>/wandb/; upload with `wandb sync`) or
#                         online [offline]
#     WANDB_PROJECT, WANDB_ENTITY   [omni-lightning, your default]
#     WANDB_RUN_GROUP     the runs' group: one pipeline [the name of $OMNI_OUT]
#     WANDB_DATA_DIR      where W&B stages tables and media until `wandb sync` [$OMNI_OUT/logs/wandb-data]
#     OMNI_WANDB_OSH      1: after each validation ask wandb-osh to sync (pip install wandb-osh, and run
#                         `wandb-osh` on a login node) [0]
#   The run id of a training job is $SLURM_JOB_ID: a requeued job continues its W&B run.
#
# * Preemption: training scripts ask for SIGUSR1 90 s before the time limit (--signal=SIGUSR1@90, sent to
#   every task: no B: prefix) and are requeueable (--requeue, --open-mode=append). The Preemption callback in
#   the configs saves $OMNI_OUT/lightning/<job>/job-$SLURM_JOB_ID/hpc_ckpt_<n>.ckpt at the end of the current
#   batch and runs `scontrol requeue`; the requeued job (same id, same folder) resumes from it. A job that is
#   preempted (SIGTERM) saves the same way and SLURM requeues it. Between signals the callback also saves every
#   OMNI_CHECKPOINT_EVERY steps (keeping the newest two), so a job killed without warning loses at most that
#   many steps: submitting the phase again resumes from the newest checkpoint of its earlier jobs that loads.

set -euo pipefail

omni_die() {
  echo "omni-lightning slurm: error: $*" >&2
  exit 2
}

# Defaults of the settings above (exported: srun tasks and submitted jobs see them).
omni_defaults() {
  export OMNI_OUT="${OMNI_OUT:-runs/demo}"
  export OMNI_BASE="${OMNI_BASE:-${OMNI_OUT}/base}"
  export OMNI_DATA="${OMNI_DATA:-${OMNI_OUT}/data}"
  export OMNI_WANDB="${OMNI_WANDB:-1}"
  export OMNI_WANDB_OSH="${OMNI_WANDB_OSH:-0}"
  export OMNI_CHECKPOINT_EVERY="${OMNI_CHECKPOINT_EVERY:-200}"
  export OMNI_RESUME="${OMNI_RESUME:-1}"
  export OMNI_OVERWRITE="${OMNI_OVERWRITE:-0}"
  export WANDB_MODE="${WANDB_MODE:-offline}"
  export WANDB_PROJECT="${WANDB_PROJECT:-omni-lightning}"
  # W&B stages logged tables and their media here until `wandb sync` uploads them: keep it on the shared file
  # system next to the runs (the default, ~/.local/share/wandb, may not be visible from the login node)
  WANDB_DATA_DIR="$(realpath -m "${WANDB_DATA_DIR:-${OMNI_OUT}/logs/wandb-data}")"
  export WANDB_DATA_DIR
  if [[ -z "${WANDB_RUN_GROUP:-}" ]]; then
    WANDB_RUN_GROUP="$(basename "$(realpath -m "${OMNI_OUT}")")"
    export WANDB_RUN_GROUP
  fi
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  local venv="${OMNI_REPO}/.venv/bin"
  if [[ -z "${OMNI_BIN:-}" ]]; then
    if [[ -x "${venv}/omni-lightning" ]]; then OMNI_BIN="${venv}/omni-lightning"; else OMNI_BIN=omni-lightning; fi
  fi
  export OMNI_BIN
  # the Python of the same installation (for `python -m omni_lightning jobs`)
  OMNI_PYTHON="${OMNI_PYTHON:-${PYTHON:-}}"
  if [[ -z "${OMNI_PYTHON}" ]]; then
    if [[ -x "${venv}/python" ]]; then OMNI_PYTHON="${venv}/python"; else OMNI_PYTHON=python3; fi
  fi
  export OMNI_PYTHON
  command -v "${OMNI_BIN}" >/dev/null || omni_die "${OMNI_BIN} not found: install omni-lightning (make venv) or set OMNI_BIN"
}

# sbatch flags from the OMNI_* resource variables that are set. $1: train | fuse | eval.
omni_sbatch_flags() {
  local kind="$1"
  OMNI_FLAGS=()
  if [[ "${kind}" == fuse ]]; then
    [[ -n "${OMNI_CPU_PARTITION:-${OMNI_PARTITION:-}}" ]] && OMNI_FLAGS+=("--partition=${OMNI_CPU_PARTITION:-${OMNI_PARTITION}}")
  else
    [[ -n "${OMNI_PARTITION:-}" ]] && OMNI_FLAGS+=("--partition=${OMNI_PARTITION}")
  fi
  [[ -n "${OMNI_ACCOUNT:-}" ]] && OMNI_FLAGS+=("--account=${OMNI_ACCOUNT}")
  [[ -n "${OMNI_QOS:-}" ]] && OMNI_FLAGS+=("--qos=${OMNI_QOS}")
  [[ -n "${OMNI_TIME:-}" ]] && OMNI_FLAGS+=("--time=${OMNI_TIME}")
  if [[ "${kind}" == train ]]; then
    [[ -n "${OMNI_NODES:-}" ]] && OMNI_FLAGS+=("--nodes=${OMNI_NODES}")
    if [[ -n "${OMNI_GPUS_PER_NODE:-}" ]]; then
      OMNI_FLAGS+=("--gpus-per-node=${OMNI_GPUS_PER_NODE}" "--ntasks-per-node=${OMNI_GPUS_PER_NODE}")
    fi
    [[ -n "${OMNI_MEM:-}" ]] && OMNI_FLAGS+=("--mem=${OMNI_MEM}")
  fi
  if [[ "${kind}" != fuse ]]; then
    [[ -n "${OMNI_CPUS_PER_TASK:-}" ]] && OMNI_FLAGS+=("--cpus-per-task=${OMNI_CPUS_PER_TASK}")
  fi
  return 0
}

# Submit a script of slurm/ with the OMNI_* resources; prints the job id. Usage:
#   omni_submit KIND SCRIPT [sbatch flags...] -- [script arguments...]
omni_submit() {
  local kind="$1" script="$2"
  shift 2
  local extra=()
  while [[ $# -gt 0 && "$1" != -- ]]; do extra+=("$1"); shift; done
  [[ $# -gt 0 ]] && shift
  command -v sbatch >/dev/null || omni_die "sbatch not found. Outside SLURM run a phase directly, e.g. " \
    "\`omni-lightning fit --config configs/recover.yaml\` (slurm/ scripts submit themselves only on a SLURM login node)"
  omni_sbatch_flags "${kind}"
  mkdir -p "${OMNI_OUT}/slurm"
  local output="${OMNI_OUT}/slurm/%x-%j.out"
  [[ "${script}" == *specialist.sh ]] && output="${OMNI_OUT}/slurm/%x-%A_%a.out"
  local id
  id="$(sbatch --parsable --chdir="${PWD}" --output="${output}" "${OMNI_FLAGS[@]}" "${extra[@]}" \
    "${OMNI_REPO}/slurm/${script}" "$@")"
  echo "${id%%;*}"  # --parsable prints "id" or "id;cluster"
}

# At the top of a job script: outside a job, submit this script and exit; inside, check the allocation.
#   omni_job KIND SCRIPT_NAME "$@"
omni_job() {
  local kind="$1" script="$2"
  shift 2
  if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    local id
    id="$(omni_submit "${kind}" "${script}" -- "$@")"
    echo "submitted ${script} as job ${id}"
    exit 0
  fi
  echo "omni-lightning ${script}: job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array task ${SLURM_ARRAY_TASK_ID})} on" \
    "$(hostname), restart ${SLURM_RESTART_COUNT:-0}, ${SLURM_NNODES:-1} node(s) x ${SLURM_NTASKS_PER_NODE:-1} task(s)"
  if [[ "${kind}" == train ]]; then
    [[ -n "${SLURM_NTASKS_PER_NODE:-}" ]] || omni_die "SLURM_NTASKS_PER_NODE is not set: submit with --ntasks-per-node" \
      "(one task per GPU), as the #SBATCH lines of slurm/${script} do"
    if [[ -n "${SLURM_GPUS_ON_NODE:-}" && "${SLURM_GPUS_ON_NODE}" != "${SLURM_NTASKS_PER_NODE}" ]]; then
      omni_die "${SLURM_NTASKS_PER_NODE} tasks per node but ${SLURM_GPUS_ON_NODE} GPUs: one task per GPU —" \
        "submit with the same --ntasks-per-node and --gpus-per-node (OMNI_GPUS_PER_NODE sets both)"
    fi
    if [[ -n "${OMNI_NODES:-}" && "${OMNI_NODES}" != "${SLURM_NNODES:-1}" ]]; then
      omni_die "OMNI_NODES=${OMNI_NODES} but the job has ${SLURM_NNODES:-1} node(s): plain sbatch ignores OMNI_*" \
        "resources; run slurm/${script} without sbatch (it submits itself) or pass sbatch --nodes"
    fi
  fi
  # srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05)
  if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK}"; fi
}

# Require a model directory (clear error otherwise). $1: what it is, $2: the path.
omni_need_model() {
  [[ -f "$2/omni_config.json" ]] || omni_die "$1 $2 is not an omni-lightning model directory (no omni_config.json);" \
    "set the variable that names it (see slurm/common.sh) or run the phase that writes it"
}

# Where a new job of phase NAME resumes (sets OMNI_RESUME_FROM, empty for a fresh start):
#   omni_resume_point NAME ROOT [fit overrides...]
# A requeued job finds its own checkpoints in ROOT (Lightning resumes from them by itself); a new job, when
# OMNI_RESUME=1 and no --ckpt_path is among the overrides, takes the newest checkpoint of the phase's earlier
# jobs that loads (one that does not is named and skipped).
omni_resume_point() {
  local name="$1" root="$2"
  shift 2
  OMNI_RESUME_FROM=""
  [[ "${OMNI_RESUME}" == 1 ]] || return 0
  local a
  for a in "$@"; do [[ "${a}" == --ckpt_path || "${a}" == --ckpt_path=* ]] && return 0; done
  compgen -G "${root}/hpc_ckpt_*.ckpt" >/dev/null && return 0
  local dirs=() d
  for d in "${OMNI_OUT}/lightning/${name}"/job-*; do
    [[ -d "${d}" && "${d}" != "${root}" ]] && compgen -G "${d}/hpc_ckpt_*.ckpt" >/dev/null && dirs+=("${d}")
  done
  [[ ${#dirs[@]} -gt 0 ]] || return 0
  OMNI_RESUME_FROM="$("${OMNI_PYTHON}" -m omni_lightning.callbacks.preemption newest "${dirs[@]}")" ||
    omni_die "could not look for checkpoints in ${dirs[*]}"
  return 0
}

# One training phase on every task of the job:
#   omni_fit NAME PHASE CONFIG MODEL_DIR EXPORT_DIR [fit overrides...]
# NAME names the run (W&B name, log folder, checkpoint folder), PHASE is the job type (specialist, recover, ...).
omni_fit() {
  local name="$1" phase="$2" config="$3" model="$4" export_dir="$5"
  shift 5
  [[ -f "${config}" ]] || omni_die "config ${config} not found (set OMNI_CONFIG, or OMNI_REPO to the repository)"
  omni_need_model "input model" "${model}"
  [[ -d "${OMNI_DATA}" ]] || omni_die "OMNI_DATA=${OMNI_DATA} does not exist: point it at a dataset root"
  local root="${OMNI_OUT}/lightning/${name}/job-${SLURM_JOB_ID}"  # preemption checkpoints of this job only
  local args=(
    fit --config "${config}"
    --trainer.devices "${SLURM_NTASKS_PER_NODE:-1}" --trainer.num_nodes "${SLURM_NNODES:-1}"
    --trainer.default_root_dir "${root}"
    --trainer.enable_progress_bar false
    --model.init_args.model "${model}" --model.init_args.export_dir "${export_dir}"
    --data.init_args.data_root "${OMNI_DATA}"
  )
  if [[ "${OMNI_WANDB}" == 1 ]]; then
    args+=(--trainer.logger omni_lightning.loggers.OmniWandbLogger
      --trainer.logger.init_args.name "${name}" --trainer.logger.init_args.job_type "${phase}"
      --trainer.logger.init_args.save_dir "${OMNI_OUT}/logs/${name}")
    if [[ "${OMNI_WANDB_OSH}" == 1 ]]; then args+=("--trainer.callbacks+=omni_lightning.callbacks.WandbOfflineSync"); fi
  else
    args+=(--trainer.logger.init_args.save_dir "${OMNI_OUT}/logs")
  fi
  if [[ -n "${OMNI_STRATEGY:-}" ]]; then args+=(--trainer.strategy "${OMNI_STRATEGY}"); fi
  if [[ "${OMNI_OVERWRITE}" == 1 ]]; then args+=(--model.init_args.export_overwrite true); fi
  mkdir -p "${root}"
  omni_resume_point "${name}" "${root}" "$@"
  if [[ -n "${OMNI_RESUME_FROM}" ]]; then
    echo "omni-lightning ${name}: resuming from ${OMNI_RESUME_FROM} (an earlier job of this phase)"
    args+=(--ckpt_path "${OMNI_RESUME_FROM}")
  fi
  echo "omni-lightning ${name}: ${model} -> ${export_dir} (checkpoints in ${root})"
  # overrides given to the script come last, so they win
  srun --kill-on-bad-exit=1 "${OMNI_BIN}" "${args[@]}" "$@"
}
