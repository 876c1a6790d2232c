"""Dashboards as code: the W&B workspace of an omni-lightning project, built with ``wandb-workspaces``.

    omni-lightning dashboard --entity ENTITY --project PROJECT            # create the view (needs an API key)
    omni-lightning dashboard --entity E --project P --dry-run             # print its outline, no network
    omni-lightning dashboard --entity E --project P --dry-run --json      # print the full view spec (JSON)

One section per phase — ``specialist``, ``fuse``, ``recover``, ``rehearse`` — then ``eval`` (every model's eval
metrics side by side) and ``optimizer`` (learning rates). Training sections hold the loss per modality,
validation loss and R@1 per modality, samples/s, skipped samples, eval metrics per modality and the table of
retrieval examples; ``recover`` adds the projector-drift panels, ``rehearse`` the sampler's mix, ``fuse`` the
task-vector norms, cosines, per-layer norms and plot. Every panel's metric names come from
:func:`omni_lightning.tracking.panels`, the catalogue the callbacks and jobs log with; line plots use
``trainer/global_step`` as x-axis and runs are grouped by W&B group (one pipeline) and job type (the phase).

``wandb-workspaces`` is a public-preview library; ``--dry-run`` builds the same objects ``save()`` would
upload (``Workspace._to_model()``), so a broken definition fails without network.
"""

from __future__ import annotations

import json
import os
from typing import Any

from omni_lightning.modalities import SPECIALISTS
from omni_lightning.tracking.catalogue import SECTIONS, STEP_KEY, Panel, panels

DEFAULT_NAME = "omni-lightning"


def _panel(p: Panel):
    import wandb_workspaces.reports.v2 as wr

    if p.kind == "line":
        if p.regex:
            return wr.LinePlot(title=p.title, x=STEP_KEY, metric_regex=p.regex)
        return wr.LinePlot(title=p.title, x=STEP_KEY, y=list(p.keys))
    if p.kind == "bar":
        return wr.BarPlot(title=p.title, metrics=list(p.keys))
    if p.kind == "table":
        (key,) = p.keys
        return wr.WeavePanelSummaryTable(table_name=key)
    if p.kind == "media":
        return wr.MediaBrowser(title=p.title, media_keys=list(p.keys))
    raise ValueError(f"unknown panel kind {p.kind!r} in {p}")


def build_workspace(entity: str, project: str, name: str = DEFAULT_NAME, sections: tuple[str, ...] = SECTIONS,
                    modalities: tuple[str, ...] = SPECIALISTS):
    """The workspace (a ``wandb_workspaces.workspaces.Workspace``; nothing is sent until ``.save()``)."""
    import wandb_workspaces.workspaces as ws

    if not entity or not project:
        raise ValueError("the dashboard needs --entity and --project (the W&B team/user and project the runs log to)")
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
    order = ("specialist", "fuse", "recover", "rehearse", "eval", "optimizer")
    built = []
    for i, section in enumerate(s for s in order if s in sections):
        mods = tuple(m for m in modalities if section != "recover" or m == "audio") or None
        built.append(ws.Section(name=section, is_open=i == 0,
                                panels=[_panel(p) for p in panels(section, mods if section != "fuse" else None)]))
    return ws.Workspace(
        entity=entity, project=project, name=name, sections=built,
        settings=ws.WorkspaceSettings(x_axis=STEP_KEY, smoothing_type="exponential", smoothing_weight=5,
                                      group_by_prefix="first", max_runs=20),
        runset_settings=ws.RunsetSettings(groupby=[ws.Metric("Group"), ws.Metric("JobType")]),
    )


def panel_keys(workspace) -> dict[str, list[str]]:
    """The metric names each section's panels name (regex panels as ``re:<pattern>``), read back from the
    built workspace."""
    out: dict[str, list[str]] = {}
    for section in workspace.sections:
        keys: list[str] = []
        for p in section.panels:
            if getattr(p, "metric_regex", None):
                keys.append(f"re:{p.metric_regex}")
            for attr in ("y", "metrics", "media_keys"):
                keys += [str(k) for k in (getattr(p, attr, None) or [])]
            if getattr(p, "table_name", None):
                keys.append(p.table_name)
        out[section.name] = keys
    return out


def outline(workspace) -> str:
    lines = [f"W&B workspace {workspace.name!r} for {workspace.entity}/{workspace.project} "
             f"(x-axis {workspace.settings.x_axis}; runs grouped by group and job type)"]
    for section in workspace.sections:
        lines.append(f"\n[{section.name}]")
        for p in section.panels:
            kind = type(p).__name__
            title = getattr(p, "title", None) or getattr(p, "table_name", "")
            keys = ([f"re:{p.metric_regex}"] if getattr(p, "metric_regex", None) else []) + [
                str(k) for attr in ("y", "metrics", "media_keys") for k in (getattr(p, attr, None) or [])]
            lines.append(f"  {kind:<22} {title}" + (f": {', '.join(keys)}" if keys else ""))
    return "\n".join(lines)


def spec(workspace) -> dict[str, Any]:
    """The view exactly as ``save()`` would upload it (built offline)."""
    return json.loads(workspace._to_model().model_dump_json())


def run_dashboard(entity: str, project: str, name: str = DEFAULT_NAME, sections: list[str] | None = None,
                  dry_run: bool = False, as_json: bool = False) -> int:
    """Build the workspace; print it (``dry_run``: outline, or the full spec with ``as_json``) or save it."""
    unknown = sorted(set(sections or ()) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown dashboard section(s) {unknown}; expected some of {list(SECTIONS)}")
    workspace = build_workspace(entity, project, name, tuple(sections) if sections else SECTIONS)
    if dry_run:
        spec(workspace)  # fails here, offline, if the definition does not build
        print(json.dumps(spec(workspace), indent=2) if as_json else outline(workspace))
        return 0
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        raise ValueError(f"WANDB_MODE={os.environ['WANDB_MODE']}: saving a workspace needs W&B's servers; run with "
                         "WANDB_MODE=online (and an API key: `wandb login`) or use --dry_run")
    from wandb.errors import UsageError

    try:
        saved = workspace.save()
    except UsageError as e:  # no API key (W&B's own message says so), or another usage problem
        raise ValueError(f"saving the workspace online needs a W&B API key (WANDB_API_KEY or `wandb login`): "
                         f"{(str(e).splitlines() or [type(e).__name__])[0].rstrip('.')} (--dry_run prints the workspace without one)") from None
    print(f"saved W&B workspace: {saved.url}")
    return 0


__all__ = ["build_workspace", "outline", "panel_keys", "run_dashboard", "spec"]
