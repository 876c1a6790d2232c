"""Evaluation metrics against brute force (ties included), chunked = unchunked, pool Hit@1, zero-shot, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torchmetrics.functional.retrieval import (
    retrieval_hit_rate,
    retrieval_normalized_dcg,
    retrieval_recall,
    retrieval_reciprocal_rank,
)

from omni_lightning.evaluation import (
    METRICS,
    evaluate_samples,
    label_codes,
    load_split,
    pool_hit1,
    rank_embeddings,
    rank_scores,
    ranking_metrics,
    relevance,
    retrieval_scores,
    zero_shot_accuracy,
)


def brute_force(scores: torch.Tensor, rel: torch.Tensor, ks=(1, 5, 10), ndcg_k=10) -> dict[str, float]:
    """Python loops: sort each row by (-score, candidate index) and read the metrics off the list."""
    sums = {f"hit{k}": 0.0 for k in ks} | {f"recall{k}": 0.0 for k in ks} | {f"ndcg{ndcg_k}": 0.0, "mrr": 0.0}
    Q, C = scores.shape
    for i in range(Q):
        order = sorted(range(C), key=lambda j: (-float(scores[i, j]), j))
        flags = [bool(rel[i, j]) for j in order]
        n_rel = sum(flags)
        if n_rel == 0:
            continue
        for k in ks:
            sums[f"hit{k}"] += float(any(flags[:k]))
            sums[f"recall{k}"] += sum(flags[:k]) / n_rel
        dcg = sum(1 / math.log2(p + 2) for p, f in enumerate(flags[:ndcg_k]) if f)
        idcg = sum(1 / math.log2(p + 2) for p in range(min(ndcg_k, n_rel)))
        sums[f"ndcg{ndcg_k}"] += dcg / idcg
        sums["mrr"] += 1 / (flags.index(True) + 1)
    return {k: v / Q for k, v in sums.items()}


def tied_problem(seed: int, Q=13, C=29, levels=4, n_labels=6):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (Q, C), generator=g).float()  # many ties
    q_lab = torch.randint(0, n_labels, (Q,), generator=g).tolist()
    c_lab = torch.randint(0, n_labels, (C,), generator=g).tolist()
    return scores, relevance(q_lab, c_lab)


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_brute_force_with_ties(seed):
    scores, rel = tied_problem(seed)
    rel[0] = False  # a query with nothing relevant counts as 0
    got = retrieval_scores(scores, rel)
    want = brute_force(scores, rel)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k


def test_metrics_match_torchmetrics_without_ties():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(20, 40, generator=g) + 0.01  # positive: torchmetrics' MRR drops candidates scoring <= 0
    rel = torch.rand(20, 40, generator=g) < 0.15
    rel[torch.arange(20), torch.randint(0, 40, (20,), generator=g)] = True  # every query has a relevant one
    got = retrieval_scores(scores, rel)
    for k in (1, 5, 10):
        want = torch.stack([retrieval_hit_rate(s, r, top_k=k) for s, r in zip(scores, rel)]).mean()
        assert got[f"hit{k}"] == pytest.approx(float(want), abs=1e-6)
        want = torch.stack([retrieval_recall(s, r, top_k=k) for s, r in zip(scores, rel)]).mean()
        assert got[f"recall{k}"] == pytest.approx(float(want), abs=1e-6)
    ndcg = torch.stack([retrieval_normalized_dcg(s, r, top_k=10) for s, r in zip(scores, rel)]).mean()
    mrr = torch.stack([retrieval_reciprocal_rank(s, r) for s, r in zip(scores, rel)]).mean()
    assert got["ndcg10"] == pytest.approx(float(ndcg), abs=1e-6)
    assert got["mrr"] == pytest.approx(float(mrr), abs=1e-6)


def pytrec_metrics(scores: torch.Tensor, rel: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """pytrec_eval (trec_eval) on the same problem. trec_eval breaks ties by document id, descending; naming
    candidate j with an id that sorts descending in candidate order gives our tie order (earlier first)."""
    import pytrec_eval

    Q, C = scores.shape
    doc = [f"d{C - 1 - j:06d}" for j in range(C)]
    qrels = {f"q{i}": {doc[j]: int(rel[i, j]) for j in range(C)} for i in range(Q)}
    run = {f"q{i}": {doc[j]: float(scores[i, j]) for j in range(C)} for i in range(Q)}
    measures = {"recip_rank", "ndcg_cut.10", "success." + ",".join(map(str, ks)), "recall." + ",".join(map(str, ks))}
    per_query = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    mean = lambda key: sum(per_query[f"q{i}"][key] for i in range(Q)) / Q  # noqa: E731
    return ({f"hit{k}": mean(f"success_{k}") for k in ks} | {f"recall{k}": mean(f"recall_{k}") for k in ks}
            | {"ndcg10": mean("ndcg_cut_10"), "mrr": mean("recip_rank")})


@pytest.mark.parametrize("seed", range(6))
def test_metrics_match_pytrec_eval_with_ties_and_several_relevant(seed):
    """hit@k = trec_eval's success@k, recall@k = its recall_k, nDCG@10 = ndcg_cut_10, MRR = recip_rank."""
    pytest.importorskip("pytrec_eval", reason="pytrec_eval (pytrec-eval-terrier, installed with mteb) is needed")
    scores, rel = tied_problem(seed, Q=17, C=40, levels=5, n_labels=4)  # ~10 relevant per query, many ties
    rel[torch.arange(17), torch.arange(17)] = True  # every query has a relevant candidate (trec_eval's domain)
    assert (rel.sum(1) > 1).all()
    got, want = retrieval_scores(scores, rel), pytrec_metrics(scores, rel)
    assert got.keys() == want.keys()
    for k in want:
        assert got[k] == pytest.approx(want[k], abs=1e-6), k
    assert any(got[f"hit{k}"] != got[f"recall{k}"] for k in (1, 5, 10))  # the two names measure different things


def test_negative_scores_count():
    # cosine scores can be negative; a relevant candidate at -0.5 ranked first is still a hit at rank 1
    got = retrieval_scores(torch.tensor([[-0.5, -0.9, -0.7]]), torch.tensor([[True, False, False]]))
    assert got["mrr"] == 1.0 and got["hit1"] == 1.0 and got["recall1"] == 1.0 and got["ndcg10"] == pytest.approx(1.0)


def test_hand_computed_example():
    # one query, candidates scored [3, 5, 5, 1]; relevant: 2 and 3. Order (ties by index): 1, 2, 0, 3.
    scores = torch.tensor([[3.0, 5.0, 5.0, 1.0]])
    rel = torch.tensor([[False, False, True, True]])
    got = retrieval_scores(scores, rel, ks=(1, 2))
    assert got["hit1"] == 0.0 and got["hit2"] == 1.0
    assert got["recall1"] == 0.0 and got["recall2"] == 0.5  # one of the two relevant candidates in the top 2
    assert got["mrr"] == pytest.approx(1 / 2)
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    assert got["ndcg10"] == pytest.approx(dcg / (1 + 1 / math.log2(3)))


@pytest.mark.parametrize("query_chunk,cand_chunk", [(1, 1), (3, 7), (5, 2), (100, 100)])
def test_chunked_scoring_equals_unchunked(query_chunk, cand_chunk):
    g = torch.Generator().manual_seed(query_chunk * 10 + cand_chunk)
    q = torch.randint(-2, 3, (17, 4), generator=g).float()  # integer embeddings: exact scores, many ties
    c = torch.randint(-2, 3, (31, 4), generator=g).float()
    q_lab = torch.randint(0, 5, (17,), generator=g).tolist()
    c_lab = torch.randint(0, 5, (31,), generator=g).tolist()
    qc, cc = label_codes(q_lab, c_lab)
    full = rank_scores(q @ c.T, qc[:, None] == cc[None, :])
    chunked = rank_embeddings(q, c, qc, cc, query_chunk=query_chunk, cand_chunk=cand_chunk)
    assert torch.equal(full.topk, chunked.topk)
    assert torch.equal(full.n_relevant, chunked.n_relevant)
    assert torch.equal(full.first_rank, chunked.first_rank)
    assert ranking_metrics(chunked) == ranking_metrics(full)
    assert ranking_metrics(full) == pytest.approx(brute_force(q @ c.T, qc[:, None] == cc[None, :]))


def test_ranking_cutoff_is_checked():
    r = rank_scores(torch.randn(3, 20), torch.eye(3, 20, dtype=torch.bool), k=5)
    with pytest.raises(ValueError, match="top 5"):
        ranking_metrics(r)


def test_labels_missing_means_own_pair():
    q, c = label_codes([None, None, None], [None, None, None])
    assert torch.equal(q[:, None] == c[None, :], torch.eye(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="one to one"):
        label_codes([None, None], [None])


def test_pool_hit1_full_pool_matches_brute_force():
    g = torch.Generator().manual_seed(3)
    Q, D = 12, 4
    q = torch.randint(-2, 3, (Q, D), generator=g).float()
    p = torch.randint(-2, 3, (Q, D), generator=g).float()
    negs = torch.randint(-2, 3, (Q, 2, D), generator=g).float()
    labels = [i % 4 for i in range(Q)]
    codes = torch.tensor(labels)
    size = 1 + 2 + sum(1 for j in range(Q) if labels[j] != labels[0])  # every distractor of another label
    want = 0
    for i in range(Q):
        others = [float(q[i] @ n) for n in negs[i]] + [float(q[i] @ p[j]) for j in range(Q) if labels[j] != labels[i]]
        want += float(q[i] @ p[i]) >= max(others)  # the positive wins ties
    assert pool_hit1(q, p, codes, size, negs, query_chunk=5) == pytest.approx(want / Q)
    # fewer distractors can only make Hit@1 easier
    assert pool_hit1(q, p, codes, 4, negs) >= want / Q
    with pytest.raises(ValueError, match="distractors"):
        pool_hit1(q, p, codes, size + 1, negs)
    with pytest.raises(ValueError, match="hard negatives"):
        pool_hit1(q, p, codes, 2, negs)


def test_zero_shot_accuracy_brute_force():
    g = torch.Generator().manual_seed(4)
    media, prompts = torch.randn(15, 3, generator=g), torch.randn(5, 3, generator=g)
    prompt_labels = list("abcde")
    media_labels = [prompt_labels[i % 5] for i in range(15)]
    want = sum(prompt_labels[max(range(5), key=lambda j: float(m @ prompts[j]))] == lab
               for m, lab in zip(media, media_labels)) / 15
    assert zero_shot_accuracy(media, media_labels, prompts, prompt_labels) == pytest.approx(want)


def test_evaluate_samples_on_tiny_model(tiny, demo_root):
    from omni_lightning.data.shards import split_dir

    model, processor = tiny
    samples = load_split(split_dir(demo_root, "image", "eval"), max_samples=24)
    res = evaluate_samples(model, processor, samples, batch_size=8, pool_size=10, progress=False)
    assert set(METRICS) <= set(res)
    assert res["n"] == 24 and res["pool_size"] == 10
    assert all(0.0 <= res[m] <= 1.0 for m in METRICS)
    # recall is monotone in k, and chunking the scoring changes nothing
    assert res["q2c_hit1"] <= res["q2c_hit5"] <= res["q2c_hit10"]
    assert res["q2c_recall1"] <= res["q2c_recall5"] <= res["q2c_recall10"] <= res["q2c_hit10"] + 1e-6  # hit: float32
    chunked = evaluate_samples(model, processor, samples, batch_size=8, pool_size=10, progress=False,
                               query_chunk=5, cand_chunk=7)
    assert chunked == res
    # independent recomputation of q2c hit@1 from the embeddings
    q = model.encode(processor, [s["query"] for s in samples], [s["instruction"] for s in samples], 8)
    c = model.encode(processor, [s["pos"] for s in samples], None, 8)
    rel = relevance([s["label"] for s in samples], [s["label"] for s in samples])
    assert res["q2c_hit1"] == pytest.approx(brute_force(q @ c.T, rel)["hit1"])


def test_eval_cli_writes_json(tiny_model_dir, demo_root, tmp_path, capsys):
    from omni_lightning.app.cli import main

    out = tmp_path / "res.json"
    rc = main(["eval", "--model", str(tiny_model_dir), "--data", str(demo_root), "--modalities", "audio", "text",
               "--max-samples", "16", "--batch-size", "8", "--pool-size", "8", "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert set(res) == {"audio", "text"} and res["audio"]["n"] == 16
    assert "q2c_ndcg10" in capsys.readouterr().out
    rc = main(["eval", "--model", str(tmp_path / "missing"), "--data", str(demo_root)])
    assert rc == 2
    assert "missing" in capsys.readouterr().err


def test_retrieval_eval_callback_logs_what_evaluation_computes(tiny_model_dir, demo_root, tmp_path):
    from conftest import fit_args
    from omni_lightning.callbacks import RetrievalEval

    from omni_lightning.app.fit import lightning_cli
    from omni_lightning.app.pipeline import config_path
    from omni_lightning.data.shards import split_dir
    from omni_lightning.model.processor import OmniProcessor

    args = fit_args(config_path("specialist/image.yaml"), tiny_model_dir, demo_root, tmp_path / "out",
                    ["--model.init_args.export_dir", "null", "--trainer.max_epochs", "2"])
    cli = lightning_cli(args[1:], run=False)  # run=False takes no subcommand
    cb = RetrievalEval(max_samples=12, batch_size=6, pool_size=6, every_n_epochs=2)
    cli.trainer.callbacks.append(cb)
    cli.trainer.fit(cli.model, cli.datamodule)
    assert [h["global_step"] for h in cb.history] == [6]  # every 2nd epoch of 3 steps: once, at the end
    samples = load_split(split_dir(demo_root, "image", "eval"), 12)
    want = evaluate_samples(cli.model.embedder, OmniProcessor.from_pretrained(tiny_model_dir), samples, 6,
                            pool_size=6, progress=False)
    logged = cli.trainer.callback_metrics
    for metric in METRICS:
        assert float(logged[f"{cli.model.phase}/eval/{metric}/image"]) == pytest.approx(want[metric], abs=1e-6)
    with pytest.raises(ValueError, match="every_n_epochs"):
        RetrievalEval(every_n_epochs=0)


# ---------------------------------------------------------------------------------------------- mixed-media items
def test_mixed_media_query_embeds_differently_and_round_trips_through_a_shard(tiny, tiny_model_dir, tmp_path):
    """An image plus a question is its own input: not the image alone, not the text alone; it survives a shard
    (the record keeps the text beside the file) and `eval` scores shards made of such queries."""
    import numpy as np

    from omni_lightning.data.schema import SchemaError, validate_item
    from omni_lightning.data.shards import split_dir, write_shards
    from omni_lightning.evaluation import evaluate_model

    model, processor = tiny
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(6)]
    question = "Which digit is shown, and in what colour?"
    mixed = {"type": "image", "image": images[0], "text": question}
    e_mixed, e_image, e_text = model.encode(processor, [mixed, {"type": "image", "image": images[0]},
                                                        {"type": "text", "text": question}], "Find the answer.")
    assert float(e_mixed @ e_image) < 1 - 1e-4 and float(e_mixed @ e_text) < 1 - 1e-4
    audio = {"type": "audio", "waveform": rng.standard_normal(8000).astype("float32"), "sample_rate": 16000}
    e_audio_mixed, e_audio = model.encode(processor, [dict(audio, text="Describe the sound."), audio], None)
    assert float(e_audio_mixed @ e_audio) < 1 - 1e-4

    samples = [{"task": "vqa", "modality": "image", "instruction": "Answer the question about the image.",
                "query": {"type": "image", "image": img, "text": f"{question} ({i})"},
                "pos": {"type": "text", "text": f"answer {i}"}, "label": f"l{i % 3}"} for i, img in enumerate(images)]
    write_shards(samples, tmp_path, "image", "eval")
    back = load_split(split_dir(tmp_path, "image", "eval"))
    assert [s["query"]["text"] for s in back] == [s["query"]["text"] for s in samples]
    assert all(np.array_equal(b["query"]["image"], s["query"]["image"]) for b, s in zip(back, samples))
    decoded = model.encode(processor, [back[0]["query"]], "Find the answer.")
    torch.testing.assert_close(decoded, model.encode(processor, [samples[0]["query"]], "Find the answer."),
                               atol=1e-6, rtol=0)
    res = evaluate_model(tiny_model_dir, tmp_path, modalities=["image"], batch_size=4, pool_size=4,
                         progress=False)["image"]  # what `omni-lightning eval` runs
    assert res["n"] == 6 and all(0.0 <= res[m] <= 1.0 for m in METRICS)
    with pytest.raises(SchemaError, match="query.text"):
        validate_item({"type": "image", "file": "query.png", "text": 3}, None, "s", "k", "query")
    with pytest.raises(SchemaError, match="only 'type', 'file' and an optional 'text'"):
        validate_item({"type": "image", "file": "query.png", "caption": "x"}, None, "s", "k", "query")


def test_non_finite_embeddings_are_an_error_not_a_perfect_score(tiny_model_dir, demo_root, tmp_path, capsys):
    """A model whose weights hold NaN: NaN scores compare false and would rank everything first (MRR 1.0); eval
    refuses it, naming the model, the modality and how many rows."""
    import shutil

    from safetensors.torch import load_file, save_file

    from omni_lightning.app.cli import main

    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, bad)
    state = load_file(str(bad / "model.safetensors"))
    key = next(k for k in state if k.endswith("language_model.norm.weight"))
    state[key] = torch.full_like(state[key], float("nan"))
    save_file(state, str(bad / "model.safetensors"), metadata={"format": "pt"})
    rc = main(["eval", "--model", str(bad), "--data", str(demo_root), "--modalities", "image", "--max-samples", "8",
               "--no-progress", "--out", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert rc == 2 and str(bad) in err and "8 of 8 image query embeddings are not finite" in err
    assert not (tmp_path / "r.json").exists()


def test_eval_of_missing_data_is_an_error_and_results_record_skips(tiny_model_dir, demo_root, tmp_path, capsys):
    from conftest import corrupt_member

    from omni_lightning.app.cli import main

    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(tmp_path / "empty")]) == 2
    assert "no eval shards" in capsys.readouterr().err
    # a corrupt sample is skipped and the results say how many
    import shutil

    data = tmp_path / "data"
    shutil.copytree(demo_root / "image", data / "image")
    shard = sorted((data / "image" / "eval").glob("*.tar"))[0]
    import tarfile

    with tarfile.open(shard) as tf:
        member = next(m.name for m in tf.getmembers() if m.name.endswith(".pos.png"))
    corrupt_member(shard, member)
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(tiny_model_dir), "--data", str(data), "--no-progress", "--out", str(out)]) == 0
    res = json.loads(out.read_text())["image"]
    assert res["skipped"] == 1 and res["n"] == 47  # demo_root holds 48 eval samples per modality
