"""The mteb adapter: mteb's mock any-to-any tasks through it, a local task from the demo shards scoring what
`omni-lightning eval` scores, instructions, mixed-media rows, and `omni-lightning mteb`. Offline."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

mteb = pytest.importorskip("mteb", reason="mteb is not installed: pip install -e '.[dev]' (it pins mteb 2.26)")

from mteb.types import PromptType  # noqa: E402

from omni_lightning.evaluation.mteb import (  # noqa: E402
    DEFAULT_INSTRUCTIONS,
    FALLBACK_INSTRUCTION,
    batch_items,
    instruction_for,
    load_prompts,
    model_meta,
    run_mteb,
    shard_retrieval_task,
)


def _ffmpeg_problem() -> str | None:
    """Why mteb's audio/video decoding (torchcodec) cannot run here, or None when it can."""
    try:
        import soundfile as sf
        from torchcodec.decoders import AudioDecoder

        buf = io.BytesIO()
        sf.write(buf, np.zeros(160, dtype=np.float32), 16000, format="WAV")
        AudioDecoder(buf.getvalue()).get_all_samples()
    except Exception as e:  # noqa: BLE001 - any failure means the same thing for these tests
        return (f"mteb decodes audio and video with torchcodec, which needs FFmpeg's shared libraries "
                f"(Debian/Ubuntu: apt-get install ffmpeg): {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return None


def needs_ffmpeg():
    problem = _ffmpeg_problem()
    if problem:
        pytest.skip(problem)


@pytest.fixture(scope="module")
def encoder(tiny_model_dir):
    return model_meta(tiny_model_dir, batch_size=16).load_model(device="cpu")


def _evaluate(encoder, task, **kwargs):
    result = mteb.evaluate(encoder, task, cache=None, show_progress_bar=False,
                           encode_kwargs={"batch_size": 16, "show_progress_bar": False}, **kwargs)
    return result.task_results[0]


# ---------------------------------------------------------------------------------------------- mock tasks
MOCKS = {
    "t2i": "MockAny2AnyRetrievalT2ITask",
    "i2t": "MockAny2AnyRetrievalI2TTask",
    "t2a": "MockAny2AnyRetrievalT2ATask",
    "a2t": "MockAny2AnyRetrievalA2TTask",
    "t2v": "MockVideoRetrievalT2V",
}


@pytest.mark.parametrize("direction", list(MOCKS))
def test_mock_any2any_tasks_give_finite_scores(encoder, direction):
    from mteb.mocks.mock_tasks import retrieval as mocks

    if "a" in direction or "v" in direction:
        needs_ffmpeg()
    if "v" in direction:
        pytest.importorskip("av", reason="mteb's mock video task writes its clips with PyAV: pip install av "
                            "(mteb[av], in the dev extra)")
    task_result = _evaluate(encoder, getattr(mocks, MOCKS[direction])())
    score = task_result.get_score()
    assert math.isfinite(score) and 0.0 <= score <= 1.0
    scores = task_result.scores["test"][0]
    assert all(math.isfinite(scores[k]) for k in ("ndcg_at_10", "mrr_at_10", "hit_rate_at_1", "recall_at_1"))


def test_audio_collator_at_the_models_rate(encoder):
    needs_ffmpeg()
    from datasets import Audio, Dataset
    from mteb._create_dataloaders import create_dataloader
    from mteb.mocks.mock_tasks.retrieval import MockAny2AnyRetrievalA2TTask
    from mteb.models.modality_collators import AudioCollator

    rng = np.random.default_rng(0)
    ds = Dataset.from_dict({"id": ["a", "b"], "audio": [
        {"array": rng.standard_normal(8000).astype(np.float32), "sampling_rate": 8000} for _ in range(2)]})
    ds = ds.cast_column("audio", Audio())
    md = MockAny2AnyRetrievalA2TTask.metadata
    loader = create_dataloader(ds, task_metadata=md, prompt_type=PromptType.query, batch_size=2)
    emb = encoder.encode(loader, task_metadata=md, hf_split="test", hf_subset="default",
                         prompt_type=PromptType.query, show_progress_bar=False)
    assert isinstance(loader.collate_fn, AudioCollator)
    assert loader.collate_fn.target_sampling_rate == encoder.model.config.audio_features.sampling_rate == 16000
    batch = next(iter(loader))
    assert all(a["sampling_rate"] == 16000 and len(a["array"]) == 16000 for a in batch["audio"])  # resampled
    assert emb.shape[0] == 2 and np.isfinite(emb).all()


# ---------------------------------------------------------------------------------------------- = omni-lightning eval
def _trec_ndcg10(predictions_file, task, hf_subset="default", split="test") -> float:
    """nDCG@10 recomputed exactly (pytrec_eval) from the run mteb saved: mteb rounds its scores to 5 digits."""
    import pytrec_eval

    run = json.loads(predictions_file.read_text())[hf_subset][split]
    task.load_data()  # mteb unloads a task's data after evaluating it
    qrels = task.dataset["default"]["test"]["relevant_docs"]
    per_query = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.10"}).evaluate(run)
    return sum(v["ndcg_cut_10"] for v in per_query.values()) / len(qrels)


@pytest.mark.parametrize("modality", ["audio", "image"])
def test_local_shard_task_scores_what_eval_scores(encoder, tiny_model_dir, demo_root, modality, tmp_path):
    if modality == "audio":
        needs_ffmpeg()
    from omni_lightning.data.shards import split_dir
    from omni_lightning.evaluation import evaluate_model

    ours = evaluate_model(tiny_model_dir, demo_root, modalities=[modality], batch_size=16, progress=False,
                          max_samples=32)[modality]
    task = shard_retrieval_task(split_dir(demo_root, modality, "eval"), max_samples=32)
    assert task.metadata.category == ("t2a" if modality == "audio" else "t2i")
    task_result = _evaluate(encoder, task, prediction_folder=tmp_path)
    scores = task_result.scores["test"][0]
    assert ours["n"] == 32 and scores["mrr_at_1000"] == pytest.approx(ours["q2c_mrr"], abs=1e-6)
    assert _trec_ndcg10(task._predictions_path(tmp_path), task) == pytest.approx(ours["q2c_ndcg10"], abs=1e-6)
    assert scores["ndcg_at_10"] == pytest.approx(ours["q2c_ndcg10"], abs=5e-6)  # mteb's 5-digit rounding
    for k in (1, 5, 10):
        assert scores[f"hit_rate_at_{k}"] == pytest.approx(ours[f"q2c_hit{k}"], abs=5e-6)
        assert scores[f"recall_at_{k}"] == pytest.approx(ours[f"q2c_recall{k}"], abs=5e-6)


def test_local_task_uses_the_shards_instruction(encoder, demo_root):
    from omni_lightning.data.shards import split_dir
    from omni_lightning.demo.corpus import DEMO_INSTRUCTIONS

    task = shard_retrieval_task(split_dir(demo_root, "image", "eval"), max_samples=8)
    assert instruction_for({}, task.metadata, PromptType.query) == DEMO_INSTRUCTIONS["image"]
    assert instruction_for({}, task.metadata, PromptType.document) is None
    with pytest.raises(ValueError, match="video"):
        shard_retrieval_task(split_dir(demo_root, "video", "eval"), max_samples=4)


# ---------------------------------------------------------------------------------------------- instructions
def test_instruction_resolution(tmp_path):
    from mteb.mocks.mock_tasks.retrieval import MockAny2AnyRetrievalT2ATask, MockAny2AnyRetrievalT2ITask

    t2a = MockAny2AnyRetrievalT2ATask.metadata
    assert instruction_for({}, t2a, PromptType.query) == DEFAULT_INSTRUCTIONS["t2a"]
    assert instruction_for({}, t2a, PromptType.document) is None  # candidates: none
    assert instruction_for({}, t2a, None) == DEFAULT_INSTRUCTIONS["t2a"]  # symmetric tasks encode as queries
    f = tmp_path / "prompts.yaml"
    f.write_text("Any2AnyRetrieval: by type\nMockAny2AnyRetrievalT2A-query: by task\n"
                 "MockAny2AnyRetrievalT2A-document: for candidates\n")
    prompts = load_prompts(f)
    assert instruction_for(prompts, t2a, PromptType.query) == "by task"  # mteb's priority: task before type
    assert instruction_for(prompts, t2a, PromptType.document) == "for candidates"
    t2i = MockAny2AnyRetrievalT2ITask.metadata
    assert instruction_for(prompts, t2i, PromptType.query) == "by type"
    assert instruction_for(prompts, t2i, PromptType.document) is None
    md = t2i.model_copy(update={"category": None, "type": "Unknown"}) if hasattr(t2i, "model_copy") else t2i
    assert instruction_for({}, md, PromptType.query) == FALLBACK_INSTRUCTION
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_prompts(tmp_path / "bad.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_prompts(tmp_path / "missing.yaml")


def test_queries_get_the_instruction_and_candidates_none(encoder, tiny_model_dir):
    from datasets import Dataset
    from mteb._create_dataloaders import create_dataloader
    from mteb.mocks.mock_tasks.retrieval import MockAny2AnyRetrievalI2TTask, MockAny2AnyRetrievalT2ITask

    texts = ["a red digit seven", "a blue digit two"]
    ds = Dataset.from_dict({"id": ["x", "y"], "text": texts})

    def enc(e, prompt_type):  # text is the query side of t2i and the candidate side of i2t
        md = (MockAny2AnyRetrievalT2ITask if prompt_type == PromptType.query else MockAny2AnyRetrievalI2TTask).metadata
        loader = create_dataloader(ds, task_metadata=md, prompt_type=prompt_type, batch_size=2)
        return e.encode(loader, task_metadata=md, hf_split="test", hf_subset="default", prompt_type=prompt_type,
                        show_progress_bar=False)

    model, processor = encoder.model, encoder.processor
    items = [{"type": "text", "text": t} for t in texts]
    want_q = model.encode(processor, items, DEFAULT_INSTRUCTIONS["t2i"]).numpy()
    want_c = model.encode(processor, items, None).numpy()
    np.testing.assert_allclose(enc(encoder, PromptType.query), want_q, atol=1e-6)
    np.testing.assert_allclose(enc(encoder, PromptType.document), want_c, atol=1e-6)
    assert not np.allclose(want_q, want_c, atol=1e-4)
    other = model_meta(tiny_model_dir, prompts={"MockAny2AnyRetrievalT2I": "Find it."}).load_model(device="cpu")
    np.testing.assert_allclose(enc(other, PromptType.query), model.encode(processor, items, "Find it.").numpy(),
                               atol=1e-6)


# ---------------------------------------------------------------------------------------------- mixed-media rows
def test_batch_items_mixed_media_rows():
    from PIL import Image

    img = Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8))
    frames = np.zeros((4, 3, 8, 8), dtype=np.uint8)  # torchcodec's [T, C, H, W]
    items = batch_items({"text": ["what digit?", "", "plain"], "image": [img, img, None]}, 16000)
    assert items[0]["type"] == "image" and items[0]["text"] == "what digit?"
    assert items[1]["type"] == "image" and "text" not in items[1]
    assert items[2] == {"type": "text", "text": "plain"}
    (v,) = batch_items({"text": ["describe"], "video": [frames]}, 16000)
    assert v["type"] == "video" and v["frames"].shape == (4, 8, 8, 3) and v["text"] == "describe"
    (a,) = batch_items({"audio": [{"array": np.zeros(100), "sampling_rate": 8000}], "text": ["listen"]}, 16000)
    assert a["type"] == "audio" and a["sample_rate"] == 8000 and a["text"] == "listen"
    with pytest.raises(ValueError, match="video and audio"):
        batch_items({"video": [frames], "audio": [{"array": np.zeros(10), "sampling_rate": 16000}]}, 16000, "VA")


# ---------------------------------------------------------------------------------------------- the command
def test_mteb_command_writes_results_and_summary(tiny_model_dir, demo_root, tmp_path, monkeypatch, capsys):
    from omni_lightning.app.cli import main
    from omni_lightning.data.shards import split_dir

    task = shard_retrieval_task(split_dir(demo_root, "image", "eval"), name="OmniDemoImageT2I", max_samples=16)
    monkeypatch.setattr(mteb, "get_task", lambda name: task if name == "OmniDemoImageT2I" else (_ for _ in ()).throw(
        KeyError(name)))
    out = tmp_path / "mteb"
    rc = main(["mteb", "--model", str(tiny_model_dir), "--tasks", "OmniDemoImageT2I", "--out", str(out),
               "--batch-size", "8", "--device", "cpu", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    (row,) = summary["tasks"]
    assert row["task"] == "OmniDemoImageT2I" and row["main_score"] == "ndcg_at_10"
    assert summary["complete"] and summary["mean"] == pytest.approx(row["score"])
    assert summary["mteb_version"] == mteb.__version__
    assert "| OmniDemoImageT2I | Any2AnyRetrieval | ndcg_at_10 |" in (out / "summary.md").read_text()
    results = list((out / "results").rglob("OmniDemoImageT2I.json"))
    assert len(results) == 1  # mteb's own result file
    assert json.loads(results[0].read_text())["scores"]["test"][0]["ndcg_at_10"] == pytest.approx(row["score"])
    assert "Mean of the main scores" in capsys.readouterr().out

    rc = main(["mteb", "--model", str(tiny_model_dir), "--benchmark", "MMEB-V2", "--out", str(out)])
    assert rc == 2 and "no benchmark 'MMEB-V2'" in capsys.readouterr().err
    rc = main(["mteb", "--model", str(tiny_model_dir), "--out", str(out)])
    assert rc == 2 and "--tasks or --benchmark" in capsys.readouterr().err
    rc = main(["mteb", "--model", str(tmp_path / "nope"), "--tasks", "OmniDemoImageT2I", "--out", str(out)])
    assert rc == 2 and "nope" in capsys.readouterr().err


def test_run_mteb_reports_a_task_missing_from_the_cache(tiny_model_dir, tmp_path):
    """Offline, a task whose dataset is not in the local cache fails with a message saying so (nothing is fetched);
    the other tasks' scores are kept and the summary says it is incomplete."""
    from mteb.mocks.mock_tasks.retrieval import MockAny2AnyRetrievalT2ITask

    summary = run_mteb(tiny_model_dir, tmp_path, tasks=[MockAny2AnyRetrievalT2ITask(), "ClothoT2ARetrieval"],
                       device="cpu", progress=False, batch_size=8)
    ok, missing = summary["tasks"]
    assert ok["score"] is not None and missing["score"] is None
    assert "mteb/Clotho" in missing["error"] and "not in the local datasets cache" in missing["error"]
    assert not summary["complete"] and summary["mean"] == pytest.approx(ok["score"])
    assert "over 1 of 2 tasks" in (tmp_path / "summary.md").read_text()


# ---------------------------------------------------------------------------------------------- SLURM
def test_slurm_eval_runs_mteb_with_the_switch(tiny_model_dir, tmp_path):
    import shutil
    import subprocess

    from test_slurm import SLURM, recorder, slurm_env

    out = tmp_path / "run"
    shutil.copytree(tiny_model_dir, out / "specialists/audio")
    env = slurm_env(tmp_path, SLURM_JOB_ID="9", OMNI_OUT=str(out), OMNI_BASE=str(tiny_model_dir),
                    OMNI_DATA=str(tmp_path / "no-shards-needed"), OMNI_PYTHON=str(recorder(tmp_path, "python")),
                    OMNI_EVAL_MTEB="MAEB(beta)")
    proc = subprocess.run(["bash", str(SLURM / "eval.sh"), "--batch-size", "16"], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "python.log").read_text().splitlines() == [
        f"-m omni_lightning mteb --model {tiny_model_dir} --out {out}/mteb/{tiny_model_dir.name} --progress false "
        "--benchmark MAEB(beta) --batch-size 16",
        f"-m omni_lightning mteb --model {out}/specialists/audio --out {out}/mteb/specialists-audio --progress false "
        "--benchmark MAEB(beta) --batch-size 16"]
    (tmp_path / "python.log").unlink()
    env.update(OMNI_EVAL_MTEB="", OMNI_EVAL_MTEB_TASKS="ClothoT2ARetrieval.v2 ClothoA2TRetrieval",
               OMNI_EVAL_MODELS=str(out / "specialists/audio"))
    proc = subprocess.run(["bash", str(SLURM / "eval.sh")], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "python.log").read_text().splitlines() == [
        f"-m omni_lightning mteb --model {out}/specialists/audio --out {out}/mteb/specialists-audio --progress false "
        "--tasks ClothoT2ARetrieval.v2 ClothoA2TRetrieval"]
