"""The metric catalogue: every metric name a phase logs and every dashboard panel, spelled once.

**The metric catalogue** (one source of truth): every name a phase logs and the dashboard shows is built by a
function here, following ``<phase>/<split>/<metric>/<modality>``. The training modules log
``<phase>/train/loss[/<modality>]``, ``<phase>/val/{loss,r1}/<modality>`` and ``<phase>/data/skipped``
(:mod:`omni_lightning.modules.base`); ``ProjectorDrift`` logs ``<phase>/drift/<metric>``; the balanced sampler
``rehearse/mix/<modality>``; the callbacks of this project ``<phase>/train/samples_per_sec`` and the tables
``<phase>/eval/examples/<modality>``; eval jobs ``<phase>/eval/<metric>/<modality>``; the fuse job ``fuse/...``.
:func:`panels` lists, per dashboard section, which of them are plotted; :mod:`omni_lightning.app.dashboard` turns
that into a W&B workspace and the tests check the names against what an offline run really recorded.
Phase names are the modules' ``phase``: ``specialist`` (one run per modality), ``recover``, ``rehearse``;
an evaluated model's phase is the step that produced it (``base`` for θ₀).
"""

from __future__ import annotations

from dataclasses import dataclass

from omni_lightning.modalities import FIT_PHASES, MODEL_PHASES, SPECIALISTS

# ------------------------------------------------------------------------------------------ the catalogue
STEP_KEY = "trainer/global_step"  # Lightning's WandbLogger defines every metric against it
DRIFT_METRICS = ("t2a_r1", "a2t_r1", "norm_ratio", "sliced_w1")  # of ProjectorDrift (+ ref_cosine with a reference)
# plotted (every metric of an eval result is logged): hit@1 both ways, nDCG@10 text → media, MMEB-style pool Hit@1.
# Eval metric names follow the field: hit<k> (success@k), recall<k> (recall@k), ndcg10, mrr; see evaluation.retrieval
EVAL_METRICS = ("q2c_hit1", "c2q_hit1", "q2c_ndcg10", "pool_hit1")
LR_REGEX = r"^lr-"  # LearningRateMonitor: lr-<optimizer>/<param group name>


def train_loss(phase: str, modality: str | None = None) -> str:
    return f"{phase}/train/loss" + (f"/{modality}" if modality else "")


def val_loss(phase: str, modality: str) -> str:
    return f"{phase}/val/loss/{modality}"


def val_r1(phase: str, modality: str) -> str:
    return f"{phase}/val/r1/{modality}"


def temperature(phase: str) -> str:
    return f"{phase}/train/temperature"


def trainable_params(phase: str, part: str) -> str:
    return f"{phase}/params/trainable/{part}"


def skipped(phase: str) -> str:
    return f"{phase}/data/skipped"


def samples_per_sec(phase: str) -> str:
    return f"{phase}/train/samples_per_sec"


def drift(phase: str, metric: str) -> str:
    return f"{phase}/drift/{metric}"


def mix(phase: str, modality: str) -> str:
    return f"{phase}/mix/{modality}"


def eval_metric(phase: str, metric: str, modality: str) -> str:
    return f"{phase}/eval/{metric}/{modality}"


def examples_table(phase: str, modality: str) -> str:
    return f"{phase}/eval/examples/{modality}"


def fuse_norm(name: str) -> str:
    return f"fuse/task_vector/norm/{name}"


def fuse_cosine(a: str, b: str) -> str:
    return f"fuse/task_vector/cosine/{a}/{b}"


FUSE_LAYER_TABLE = "fuse/task_vector/layer_norm"
FUSE_PLOT = "fuse/diagnostics"


@dataclass(frozen=True)
class Panel:
    """One dashboard panel: ``kind`` is ``line`` (against ``trainer/global_step``), ``bar``, ``table`` or
    ``media``; ``keys`` are the metric names (``regex`` selects them by pattern instead)."""

    title: str
    kind: str
    keys: tuple[str, ...] = ()
    regex: str | None = None


def panels(section: str, modalities: tuple[str, ...] | None = None, names: tuple[str, ...] = SPECIALISTS
           ) -> list[Panel]:
    """The panels of one dashboard section: a training phase (``specialist``, ``recover``, ``rehearse``),
    ``fuse``, ``eval`` or ``optimizer``. ``modalities`` narrows the per-modality panels (default: the
    phase's); ``names`` are the fused specialists' names (``fuse``)."""
    if section in FIT_PHASES:
        p, mods = section, tuple(modalities or FIT_PHASES[section])
        out = [
            Panel("train loss per modality", "line", tuple(train_loss(p, m) for m in mods)),
            Panel("val loss per modality", "line", tuple(val_loss(p, m) for m in mods)),
            Panel("val in-batch hit@1 per modality", "line", tuple(val_r1(p, m) for m in mods)),
            Panel("samples/s", "line", (samples_per_sec(p),)),
            Panel("skipped samples", "line", (skipped(p),)),
        ]
        if p == "recover":
            out += [Panel("projector drift: retrieval", "line", (drift(p, "t2a_r1"), drift(p, "a2t_r1"))),
                    Panel("projector drift: audio tokens vs embedding rows", "line",
                          (drift(p, "norm_ratio"), drift(p, "sliced_w1")))]
        if p == "rehearse":
            out.append(Panel("sampler mix (share of samples)", "line", tuple(mix(p, m) for m in mods)))
        out += [Panel(f"eval {metric} per modality", "bar", tuple(eval_metric(p, metric, m) for m in mods))
                for metric in EVAL_METRICS]
        out += [Panel(f"retrieval examples: {m}", "table", (examples_table(p, m),)) for m in mods]
        return out
    if section == "fuse":
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        return [Panel("task-vector L2 norm", "bar", tuple(fuse_norm(n) for n in names)),
                Panel("task-vector cosine", "bar", tuple(fuse_cosine(a, b) for a, b in pairs)),
                Panel("per-layer task-vector norm", "table", (FUSE_LAYER_TABLE,)),
                Panel("diagnostics plot", "media", (FUSE_PLOT,))]
    if section == "eval":
        mods = tuple(modalities or SPECIALISTS)
        return [Panel(f"eval {metric}: {m} by model", "bar", tuple(eval_metric(p, metric, m) for p in MODEL_PHASES))
                for metric in EVAL_METRICS for m in mods]
    if section == "optimizer":
        return [Panel("learning rate", "line", regex=LR_REGEX)]
    raise ValueError(f"unknown dashboard section {section!r}; expected one of {SECTIONS}")


SECTIONS = (*FIT_PHASES, "fuse", "eval", "optimizer")
