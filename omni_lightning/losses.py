"""The contrastive core shared by every phase of the recipe.

One loss (InfoNCE) with the options the recipe and its users need:

* temperature ``tau`` (paper: 0.02), optionally learnable (parameterised as ``log(1/tau)``, clamped);
* ``symmetric``: average of query→target and target→query InfoNCE (the paper's setting for symmetric pairs);
* hard negatives: ``k`` per query, appended to the candidate pool that every query scores against
  (in-batch positives of other queries + every hard negative in the global batch, as Tevatron does);
* cross-device negatives: embeddings of every rank are gathered, so each query is scored against the global
  batch. The loss value on every rank equals the single-process loss on the concatenated batch; the backward
  keeps only the local slice of the gradient, scaled by the world size, so that after DDP averages parameter
  gradients they equal the single-process gradients exactly (every rank computes the same loss, so the
  gradient it would receive from the other ranks is the local one, ``world_size`` times);
* false-negative masking: a candidate (other than the positive) whose score exceeds the positive's score plus
  ``false_negative_margin`` is removed from that query's softmax;
* GradCache (:func:`grad_cache_step`): embeddings are first computed chunk by chunk without a graph, the loss
  and its gradient w.r.t. the embeddings are computed on the cached embeddings, and each chunk is re-encoded
  with a graph and back-propagated with its cached gradient. Parameter gradients equal the full-batch ones
  while activation memory is bounded by one chunk, under every precision (a loss scale is applied once).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ContrastiveLoss", "gather_with_local_grad", "grad_cache_step", "info_nce"]


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


class _GatherLocalGrad(torch.autograd.Function):
    """All-gather along dim 0 (equal sizes on every rank); backward returns the local slice × world size."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        world, rank = _world()
        ctx.world, ctx.rank, ctx.n = world, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        lo = ctx.rank * ctx.n
        return grad[lo : lo + ctx.n] * ctx.world


def gather_with_local_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` from every rank (rank order). Identity when not distributed.

    Every rank must pass the same shape. The gradient that flows back is the local slice times the world
    size: correct for a loss that every rank computes identically on the gathered tensor, once DDP averages.
    """
    world, _ = _world()
    if world == 1:
        return x
    return _GatherLocalGrad.apply(x)


def info_nce(
    queries: Tensor,
    candidates: Tensor,
    targets: Tensor,
    temperature: Tensor | float,
    false_negative_margin: float | None = None,
) -> Tensor:
    """Mean cross-entropy of ``queries @ candidates.T / temperature`` against ``targets`` (column indices).

    With ``false_negative_margin`` set, any non-target column scoring above ``score(target) + margin`` for
    a row is masked out of that row's softmax.
    """
    scores = queries @ candidates.T
    logits = scores / temperature
    if false_negative_margin is not None:
        rows = torch.arange(scores.shape[0], device=scores.device)
        pos = scores[rows, targets].unsqueeze(1)
        mask = scores.detach() > pos.detach() + false_negative_margin
        mask[rows, targets] = False
        # Mask after scaling: dividing -inf by a learnable temperature would give a NaN temperature gradient
        # (0 * inf in the division's backward).
        logits = logits.masked_fill(mask, float("-inf"))
    return F.cross_entropy(logits, targets)


class ContrastiveLoss(nn.Module):
    """InfoNCE over (query, positive[, hard negatives]) embeddings; see the module docstring.

    Args:
        temperature: softmax temperature τ (paper: 0.02).
        learnable_temperature: learn τ (as ``log(1/τ)``), clamped to ``[min_temperature, 1]``; a fixed τ is
            used as given.
        min_temperature: lower clamp for a learnable τ (ignored for a fixed one).
        symmetric: average query→target and target→query losses.
        cross_device: gather embeddings from every rank (no effect when not distributed).
        false_negative_margin: mask candidates scoring above the positive + margin (``None``: off).
    """

    def __init__(
        self,
        temperature: float = 0.02,
        learnable_temperature: bool = False,
        min_temperature: float = 0.005,
        symmetric: bool = False,
        cross_device: bool = True,
        false_negative_margin: float | None = None,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if learnable_temperature:
            # The learnable τ lives in [min_temperature, 1]; a start outside it would sit on the clamp with a
            # zero gradient forever. A fixed τ is used as given (no clamp, min_temperature unused).
            if not 0 < min_temperature <= temperature:
                raise ValueError(f"min_temperature must be in (0, temperature], got {min_temperature}")
            if temperature > 1:
                raise ValueError(f"a learnable temperature must be <= 1, got {temperature}")
        self.symmetric = symmetric
        self.cross_device = cross_device
        self.false_negative_margin = false_negative_margin
        self.min_temperature = min_temperature
        self.learnable_temperature = learnable_temperature
        log_inv = torch.tensor(math.log(1.0 / temperature))
        if learnable_temperature:
            self.log_inv_temperature = nn.Parameter(log_inv)
        else:
            self.register_buffer("log_inv_temperature", log_inv, persistent=False)

    @property
    def temperature(self) -> Tensor:
        if not self.learnable_temperature:
            return 1.0 / self.log_inv_temperature.exp()
        max_log_inv = math.log(1.0 / self.min_temperature)
        return 1.0 / self.log_inv_temperature.clamp(0.0, max_log_inv).exp()

    def forward(self, queries: Tensor, positives: Tensor, negatives: Tensor | None = None) -> Tensor:
        """``queries`` and ``positives``: ``[B, D]``; ``negatives``: ``[B, K, D]`` or ``None``."""
        if queries.shape != positives.shape:
            raise ValueError(f"queries {tuple(queries.shape)} and positives {tuple(positives.shape)} differ")
        if negatives is not None and (negatives.dim() != 3 or negatives.shape[0] != queries.shape[0]):
            raise ValueError(f"negatives must be [B, K, D] with B={queries.shape[0]}, got {tuple(negatives.shape)}")
        gather = gather_with_local_grad if self.cross_device else (lambda t: t)
        q, p = gather(queries), gather(positives)
        candidates = p
        if negatives is not None and negatives.shape[1] > 0:
            candidates = torch.cat([p, gather(negatives.flatten(0, 1))], 0)
        targets = torch.arange(q.shape[0], device=q.device)
        tau = self.temperature
        loss = info_nce(q, candidates, targets, tau, self.false_negative_margin)
        if self.symmetric:
            loss = 0.5 * (loss + info_nce(p, q, targets, tau, self.false_negative_margin))
        return loss


def grad_cache_step(
    encode: Callable[[Any], Tensor],
    sides: Sequence[Sequence[Any]],
    loss_fn: Callable[..., Tensor],
    backward: Callable[[Tensor], None] = Tensor.backward,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
    needs_grad: Callable[[Any], bool] | None = None,
) -> Tensor:
    """One GradCache step; returns the (detached) loss. Gradients are accumulated into the parameters.

    Args:
        encode: maps one chunk of model inputs to its embeddings ``[n, D]``.
        sides: for each side of the loss (queries, positives, negatives...), its list of input chunks.
        loss_fn: called with one embedding tensor per side (chunks concatenated), returns a scalar.
        backward: how to back-propagate a scalar (Lightning: ``self.manual_backward``).
        no_sync: context manager factory that disables DDP gradient sync; used for every re-forward but
            the last so gradients are reduced once.
        needs_grad: tells whether a chunk's forward reaches a trainable parameter; chunks that do not (e.g. the
            text side while only the audio projector trains) are not re-encoded at all.

    The random state is saved before each chunk's first forward and restored for its re-forward, so
    dropout masks match and the gradients equal those of the full batch.
    """
    cuda = torch.cuda.is_available()
    jobs: list[tuple[int, Any, Any, int, int]] = []  # (side, chunk, rng state, start, end)
    cached: list[Tensor] = []
    with torch.no_grad():
        for side, chunks in enumerate(sides):
            embs, start = [], 0
            for chunk in chunks:
                state = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None)
                emb = encode(chunk)
                jobs.append((side, chunk, state, start, start + emb.shape[0]))
                start += emb.shape[0]
                embs.append(emb)
            cached.append(torch.cat(embs, 0))
    leaves = [e.detach().requires_grad_(True) for e in cached]
    loss = loss_fn(*leaves)
    # The cached gradients dL/de are taken with plain autograd, unscaled: ``backward`` may scale what it
    # back-propagates (Lightning's 16-mixed GradScaler multiplies by its scale S), and the re-forwards below go
    # through ``backward`` again, so a scaled dL/de would carry S twice (an S-times too large update, or a step
    # skipped as overflow). ``backward(loss)`` still runs, once, for any parameter of the loss itself
    # (learnable temperature), which then carries the scale exactly once like every model parameter.
    grads = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
    grads = [g if g is not None else torch.zeros_like(leaf) for g, leaf in zip(grads, leaves)]
    backward(loss)

    if needs_grad is not None:
        jobs = [job for job in jobs if needs_grad(job[1])]
    for i, (side, chunk, (cpu_state, cuda_state), start, end) in enumerate(jobs):
        last = i == len(jobs) - 1
        ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        with ctx, torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
            torch.set_rng_state(cpu_state)
            if cuda_state is not None:
                torch.cuda.set_rng_state_all(cuda_state)
            emb = encode(chunk)
            backward((emb * grads[side][start:end]).sum())
    return loss.detach()
