"""Tests for the contrastive core (``omni_lightning.losses``).

Every expected value comes from an independent computation written out here -- explicit per-row loops
with ``math.exp``/``math.log`` on Python floats for values, and a per-row torch twin of that loop (for
autograd reference gradients) -- never from another call into the module under test.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from omni_lightning.losses import (
    ContrastiveLoss,
    gather_with_local_grad,
    grad_cache_step,
    info_nce,
)

DT = torch.float64  # double precision so that tolerances separate round-off from real errors


# --------------------------------------------------------------------------------------------------------------
# Independent references
# --------------------------------------------------------------------------------------------------------------


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _ref_rows(queries, candidates, targets, tau, margin, exp, log):
    """Mean over rows of ``-log softmax`` at the target column, one row and one candidate at a time, on nested
    lists of floats. A non-target candidate whose raw score exceeds ``score(target) + margin`` is left out of
    that row's denominator."""
    total = 0.0
    for i, q in enumerate(queries):
        scores = [_dot(q, c) for c in candidates]
        t = targets[i]
        pos = scores[t]
        denom = 0.0
        for j, s in enumerate(scores):
            if j != t and margin is not None and s > pos + margin:
                continue
            denom = denom + exp(s / tau)
        total = total + (log(denom) - pos / tau)
    return total / len(queries)


def _pool(p, negs):
    """Candidate pool: every positive of the batch, then every hard negative of the batch (row-major)."""
    pool = list(p)
    if negs is not None:
        for row in negs:
            pool.extend(row)
    return pool


def ref_loss_math(q, p, negs=None, tau=0.05, symmetric=False, margin=None):
    """Pure-Python value of the loss (``math.exp``/``math.log`` on floats)."""
    q, p = q.double().tolist(), p.double().tolist()
    n = None if negs is None else negs.double().tolist()
    tau = float(tau)
    targets = list(range(len(q)))
    loss = _ref_rows(q, _pool(p, n), targets, tau, margin, math.exp, math.log)
    if symmetric:  # p -> q direction: only the in-batch queries are candidates (no hard negatives)
        loss = 0.5 * (loss + _ref_rows(p, q, targets, tau, margin, math.exp, math.log))
    return loss


def _ref_rows_torch(queries, candidates, tau, margin):
    """Differentiable twin of :func:`_ref_rows` (target of row i = column i): still one row at a time, with
    the row's scores as a vector so that autograd stays fast."""
    total = 0.0
    for i in range(queries.shape[0]):
        scores = candidates @ queries[i]
        pos = scores[i]
        keep = [j == i or margin is None or not scores[j].item() > pos.item() + margin
                for j in range(candidates.shape[0])]
        denom = torch.exp(scores[torch.tensor(keep)] / tau).sum()
        total = total + (torch.log(denom) - pos / tau)
    return total / queries.shape[0]


def ref_loss_torch(q, p, negs=None, tau=0.05, symmetric=False, margin=None):
    """Same computation as :func:`ref_loss_math` on torch ops, so autograd gives reference gradients."""
    pool = p if negs is None else torch.cat([p, negs.reshape(-1, negs.shape[-1])])  # row-major, as _pool
    loss = _ref_rows_torch(q, pool, tau, margin)
    if symmetric:
        loss = 0.5 * (loss + _ref_rows_torch(p, q, tau, margin))
    return loss


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=DT), dim=-1)


def assert_grads_close(actual, expected, rtol=1e-5):
    """Relative comparison per tensor: |a - e| <= rtol * max|e| (elementwise rtol is meaningless near 0)."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a is not None and e is not None
        assert a.shape == e.shape
        scale = e.abs().max().item()
        assert scale > 0
        err = (a.double() - e.double()).abs().max().item()
        assert err <= rtol * scale, f"max abs error {err:.3e} vs scale {scale:.3e}"


# --------------------------------------------------------------------------------------------------------------
# 1. InfoNCE against the hand-written reference
# --------------------------------------------------------------------------------------------------------------


def test_reference_is_sane():
    # Identity sanity of the reference itself: perfectly separated pairs at low temperature -> loss ~ 0,
    # all-equal scores -> log(number of candidates).
    e = torch.eye(4, dtype=DT)
    assert 0 <= ref_loss_math(e, e, tau=0.01) < 1e-40
    z = torch.ones(3, 2, dtype=DT)
    assert ref_loss_math(z, z, tau=0.1) == pytest.approx(math.log(3))
    # The scalar (math) and the differentiable (torch) references agree with each other.
    q, p = _false_negative_batch()[:2]
    n = _unit(4, 2, 8, seed=33)
    for symmetric in (False, True):
        for margin in (None, 0.1, -0.05):
            a = ref_loss_math(q, p, n, tau=0.05, symmetric=symmetric, margin=margin)
            b = ref_loss_torch(q, p, n, tau=0.05, symmetric=symmetric, margin=margin).item()
            assert a == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize("tau", [0.02, 0.05, 0.7])
def test_in_batch_matches_reference(tau):
    q, p = _unit(6, 8, seed=1), _unit(6, 8, seed=2)
    loss = ContrastiveLoss(temperature=tau, cross_device=False)(q, p)
    assert loss.item() == pytest.approx(ref_loss_math(q, p, tau=tau), rel=1e-6)


def test_fixed_temperature_used_as_given():
    q, p = _unit(5, 8, seed=3), _unit(5, 8, seed=4)
    for tau in (0.001, 2.0):  # below the default min_temperature / above 1: a fixed tau is not clamped
        crit = ContrastiveLoss(temperature=tau, cross_device=False)
        assert crit.temperature.item() == pytest.approx(tau, rel=1e-6)
        assert list(crit.parameters()) == []
        assert crit(q, p).item() == pytest.approx(ref_loss_math(q, p, tau=tau), rel=1e-5)


def test_info_nce_arbitrary_targets():
    q, c = _unit(5, 8, seed=5), _unit(9, 8, seed=6)
    targets = torch.tensor([3, 0, 8, 3, 5])
    got = info_nce(q, c, targets, 0.05)
    want = _ref_rows(q.tolist(), c.tolist(), targets.tolist(), 0.05, None, math.exp, math.log)
    assert got.item() == pytest.approx(want, rel=1e-6)


def test_hard_negatives_match_reference():
    b, k, d = 5, 2, 8
    q, p, n = _unit(b, d, seed=7), _unit(b, d, seed=8), _unit(b, k, d, seed=9)
    crit = ContrastiveLoss(temperature=0.05, cross_device=False)
    loss = crit(q, p, n)
    want = ref_loss_math(q, p, n, tau=0.05)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    # Hard negatives must matter, and all of them must be in every row's pool: dropping the negatives of a
    # single query (pool of B + (B-1)K) gives a different value.
    assert abs(want - ref_loss_math(q, p, tau=0.05)) > 1e-3
    assert abs(want - ref_loss_math(q, p, n[1:], tau=0.05)) > 1e-3
    # K = 0 is the same as no negatives.
    assert crit(q, p, n[:, :0]).item() == pytest.approx(ref_loss_math(q, p, tau=0.05), rel=1e-6)


def test_hard_negatives_gradients_match_reference():
    b, k, d = 4, 2, 6
    leaves = [_unit(b, d, seed=10), _unit(b, d, seed=11), _unit(b, k, d, seed=12)]
    q, p, n = (t.clone().requires_grad_(True) for t in leaves)
    ContrastiveLoss(temperature=0.05, cross_device=False)(q, p, n).backward()
    rq, rp, rn = (t.clone().requires_grad_(True) for t in leaves)
    ref_loss_torch(rq, rp, rn, tau=0.05).backward()
    assert_grads_close([q.grad, p.grad, n.grad], [rq.grad, rp.grad, rn.grad], rtol=1e-6)


@pytest.mark.parametrize("with_negatives", [False, True])
def test_symmetric_matches_reference(with_negatives):
    b, k, d = 6, 2, 8
    q, p = _unit(b, d, seed=13), _unit(b, d, seed=14)
    n = _unit(b, k, d, seed=15) if with_negatives else None
    loss = ContrastiveLoss(temperature=0.05, symmetric=True, cross_device=False)(q, p, n)
    want = ref_loss_math(q, p, n, tau=0.05, symmetric=True)
    assert loss.item() == pytest.approx(want, rel=1e-6)
    # Independent check of the definition: mean of the two directions, hard negatives only for q -> p.
    q2p = ref_loss_math(q, p, n, tau=0.05)
    p2q = ref_loss_math(p, q, tau=0.05)
    assert want == pytest.approx(0.5 * (q2p + p2q), rel=1e-12)
    assert abs(want - q2p) > 1e-3
    if with_negatives:  # negatives in the reverse direction would give this other value
        p2q_with_negs = _ref_rows(p.tolist(), _pool(q.tolist(), n.tolist()), list(range(b)), 0.05, None,
                                  math.exp, math.log)
        assert abs(loss.item() - 0.5 * (q2p + p2q_with_negs)) > 1e-3


def test_symmetric_gradients_match_reference():
    b, k, d = 4, 2, 6
    leaves = [_unit(b, d, seed=16), _unit(b, d, seed=17), _unit(b, k, d, seed=18)]
    q, p, n = (t.clone().requires_grad_(True) for t in leaves)
    ContrastiveLoss(temperature=0.05, symmetric=True, cross_device=False)(q, p, n).backward()
    rq, rp, rn = (t.clone().requires_grad_(True) for t in leaves)
    ref_loss_torch(rq, rp, rn, tau=0.05, symmetric=True).backward()
    assert_grads_close([q.grad, p.grad, n.grad], [rq.grad, rp.grad, rn.grad], rtol=1e-6)


def _false_negative_batch():
    """Row 0's query is almost identical to row 2's positive and to its own first hard negative: both are
    false negatives for row 0 (they beat its positive by far more than the margin)."""
    b, k, d = 4, 2, 8
    q, p, n = _unit(b, d, seed=19), _unit(b, d, seed=20), _unit(b, k, d, seed=21)
    p = p.clone()
    n = n.clone()
    p[0] = F.normalize(0.3 * q[0] + p[0], dim=0)  # the true positive: moderate score
    p[2] = F.normalize(q[0] + 0.05 * p[2], dim=0)  # in-batch false negative for row 0
    n[0, 0] = F.normalize(q[0] + 0.05 * n[0, 0], dim=0)  # hard-negative false negative for row 0
    return q, p, n


@pytest.mark.parametrize("symmetric", [False, True])
def test_false_negative_masking(symmetric):
    q, p, n = _false_negative_batch()
    margin = 0.1
    scores0 = [float(q[0] @ c) for c in _pool(list(p), list(n))]
    masked_in_row0 = [j for j, s in enumerate(scores0) if j != 0 and s > scores0[0] + margin]
    assert 2 in masked_in_row0 and 4 in masked_in_row0  # the construction really triggers the mask

    crit = ContrastiveLoss(temperature=0.05, symmetric=symmetric, cross_device=False, false_negative_margin=margin)
    got = crit(q, p, n).item()
    want = ref_loss_math(q, p, n, tau=0.05, symmetric=symmetric, margin=margin)
    unmasked = ref_loss_math(q, p, n, tau=0.05, symmetric=symmetric)
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(want - unmasked) > 0.5  # masking makes a real difference here
    # A margin nobody exceeds is the unmasked loss.
    loose = ContrastiveLoss(temperature=0.05, symmetric=symmetric, cross_device=False, false_negative_margin=10.0)
    assert loose(q, p, n).item() == pytest.approx(unmasked, rel=1e-6)

    # Gradients: finite, and equal to the reference's (masked candidates get no gradient).
    q1, p1, n1 = (t.clone().requires_grad_(True) for t in (q, p, n))
    crit(q1, p1, n1).backward()
    q2, p2, n2 = (t.clone().requires_grad_(True) for t in (q, p, n))
    ref_loss_torch(q2, p2, n2, tau=0.05, symmetric=symmetric, margin=margin).backward()
    assert_grads_close([q1.grad, p1.grad, n1.grad], [q2.grad, p2.grad, n2.grad], rtol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_false_negative_negative_margin_never_masks_the_positive(symmetric):
    # With margin < 0 the positive itself satisfies "score > score(positive) + margin"; it must stay in.
    q, p, n = _unit(5, 8, seed=30), _unit(5, 8, seed=31), _unit(5, 2, 8, seed=32)
    crit = ContrastiveLoss(temperature=0.05, symmetric=symmetric, cross_device=False, false_negative_margin=-0.05)
    got = crit(q, p, n).item()
    assert math.isfinite(got)
    want = ref_loss_math(q, p, n, tau=0.05, symmetric=symmetric, margin=-0.05)
    assert got == pytest.approx(want, rel=1e-6)
    assert abs(want - ref_loss_math(q, p, n, tau=0.05, symmetric=symmetric)) > 1e-3


def test_false_negative_masking_with_learnable_temperature_has_finite_gradient():
    q, p, n = _false_negative_batch()
    crit = ContrastiveLoss(temperature=0.05, learnable_temperature=True, cross_device=False,
                           false_negative_margin=0.1)
    crit(q, p, n).backward()
    g = crit.log_inv_temperature.grad
    assert g is not None and torch.isfinite(g).all()
    # Reference: the same loop with tau = exp(-s), s a leaf.
    s = torch.tensor(math.log(1 / 0.05), dtype=DT, requires_grad=True)
    ref_loss_torch(q, p, n, tau=torch.exp(-s), margin=0.1).backward()
    assert g.item() == pytest.approx(s.grad.item(), rel=1e-5)


def test_learnable_temperature_gradient_and_step():
    q, p, n = _unit(6, 8, seed=22), _unit(6, 8, seed=23), _unit(6, 2, 8, seed=24)
    crit = ContrastiveLoss(temperature=0.05, learnable_temperature=True, cross_device=False, symmetric=True)
    params = list(crit.parameters())
    assert len(params) == 1 and params[0] is crit.log_inv_temperature
    assert crit.log_inv_temperature.item() == pytest.approx(math.log(20.0), rel=1e-6)
    loss = crit(q, p, n)
    assert loss.item() == pytest.approx(ref_loss_math(q, p, n, tau=0.05, symmetric=True), rel=1e-5)
    loss.backward()
    g = crit.log_inv_temperature.grad
    s = torch.tensor(math.log(20.0), dtype=DT, requires_grad=True)
    ref_loss_torch(q, p, n, tau=torch.exp(-s), symmetric=True).backward()
    assert g is not None and g.item() != 0.0
    assert g.item() == pytest.approx(s.grad.item(), rel=1e-5)
    before = crit.temperature.item()
    torch.optim.SGD(crit.parameters(), lr=0.1).step()
    assert crit.temperature.item() != pytest.approx(before, rel=1e-6)


def test_learnable_temperature_clamp():
    q, p = _unit(6, 8, seed=25), _unit(6, 8, seed=26)
    crit = ContrastiveLoss(temperature=0.05, learnable_temperature=True, min_temperature=0.01, cross_device=False)
    with torch.no_grad():
        crit.log_inv_temperature.fill_(math.log(1 / 0.001))  # below the floor -> tau = min_temperature
    assert crit.temperature.item() == pytest.approx(0.01, rel=1e-6)
    loss = crit(q, p)
    assert loss.item() == pytest.approx(ref_loss_math(q, p, tau=0.01), rel=1e-5)
    loss.backward()
    assert crit.log_inv_temperature.grad.item() == 0.0  # flat beyond the clamp
    crit.zero_grad()
    with torch.no_grad():
        crit.log_inv_temperature.fill_(-2.0)  # tau would be e^2 > 1 -> clamped to 1
    assert crit.temperature.item() == pytest.approx(1.0, rel=1e-6)
    loss = crit(q, p)
    assert loss.item() == pytest.approx(ref_loss_math(q, p, tau=1.0), rel=1e-6)
    loss.backward()
    assert crit.log_inv_temperature.grad.item() == 0.0


def test_bad_shapes_and_arguments_raise():
    crit = ContrastiveLoss(cross_device=False)
    q = _unit(4, 8, seed=27)
    with pytest.raises(ValueError):
        crit(q, _unit(5, 8, seed=28))  # batch mismatch
    with pytest.raises(ValueError):
        crit(q, _unit(4, 7, seed=28))  # dim mismatch
    with pytest.raises(ValueError):
        crit(q, q, _unit(4, 8, seed=29))  # negatives not [B, K, D]
    with pytest.raises(ValueError):
        crit(q, q, _unit(3, 2, 8, seed=29))  # negatives batch mismatch
    with pytest.raises(ValueError):
        ContrastiveLoss(temperature=0.0)
    with pytest.raises(ValueError):
        ContrastiveLoss(temperature=-0.1)
    with pytest.raises(ValueError):
        ContrastiveLoss(temperature=0.02, learnable_temperature=True, min_temperature=0.05)
    with pytest.raises(ValueError):
        ContrastiveLoss(temperature=0.02, learnable_temperature=True, min_temperature=0.0)
    with pytest.raises(ValueError):
        ContrastiveLoss(temperature=2.0, learnable_temperature=True)


def test_gather_is_identity_without_process_group():
    assert not dist.is_initialized()
    x = torch.randn(3, 4)
    assert gather_with_local_grad(x) is x


# --------------------------------------------------------------------------------------------------------------
# 2. Cross-device negatives: 2 CPU processes, gloo
# --------------------------------------------------------------------------------------------------------------

WORLD = 2
B_LOCAL, K, D_IN, D_OUT = 4, 2, 6, 8

# (name, ContrastiveLoss kwargs, with hard negatives)
DIST_CASES = [
    ("plain", dict(temperature=0.05), False),
    ("hard_negatives", dict(temperature=0.05), True),
    ("symmetric_hard_negatives", dict(temperature=0.05, symmetric=True), True),
    ("learnable_tau_fn_mask", dict(temperature=0.05, learnable_temperature=True, false_negative_margin=0.0,
                                   symmetric=True), True),
]


def _encoder() -> nn.Linear:
    torch.manual_seed(1234)  # same initial weights on every rank and in the parent
    return nn.Linear(D_IN, D_OUT).to(DT)


def _dist_inputs():
    g = torch.Generator().manual_seed(99)
    xq = torch.randn(WORLD * B_LOCAL, D_IN, generator=g, dtype=DT)
    xp = torch.randn(WORLD * B_LOCAL, D_IN, generator=g, dtype=DT)
    xn = torch.randn(WORLD * B_LOCAL, K, D_IN, generator=g, dtype=DT)
    return xq, xp, xn


def _embed(model, x):
    return F.normalize(model(x), dim=-1)


def _dist_worker(rank, port, out_dir, xq, xp, xn):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        sl = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        results = {}
        # The gather itself: rank order, and the local slice × world size flows back.
        x = torch.full((2, 3), float(rank), dtype=DT, requires_grad=True)
        gathered = gather_with_local_grad(x)
        (gathered * torch.arange(gathered.numel(), dtype=DT).view_as(gathered)).sum().backward()
        results["gather"] = (gathered.detach().clone(), x.grad.clone())
        for name, kwargs, with_negs in DIST_CASES:
            model = _encoder()
            crit = ContrastiveLoss(cross_device=True, **kwargs)
            q, p = _embed(model, xq[sl]), _embed(model, xp[sl])
            n = _embed(model, xn[sl]) if with_negs else None
            loss = crit(q, p, n)
            loss.backward()
            params = list(model.parameters()) + list(crit.parameters())
            grads = []
            for prm in params:  # exactly what DDP does: sum over ranks, divide by world size
                g = prm.grad.detach().clone()
                dist.all_reduce(g)
                grads.append(g / WORLD)
            results[name] = (loss.item(), grads)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("dist"))
    xq, xp, xn = _dist_inputs()
    mp.spawn(_dist_worker, args=(_free_port(), out_dir, xq, xp, xn), nprocs=WORLD, join=True)
    return [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(WORLD)]


def test_gather_with_local_grad_two_ranks(dist_results):
    coeff = torch.arange(WORLD * 2 * 3, dtype=DT).view(WORLD * 2, 3)
    expected_gathered = torch.cat([torch.full((2, 3), float(r), dtype=DT) for r in range(WORLD)])
    for rank, res in enumerate(dist_results):
        gathered, grad = res["gather"]
        torch.testing.assert_close(gathered, expected_gathered, rtol=0, atol=0)
        torch.testing.assert_close(grad, WORLD * coeff[rank * 2 : rank * 2 + 2], rtol=0, atol=0)


@pytest.mark.parametrize("case", DIST_CASES, ids=[c[0] for c in DIST_CASES])
def test_cross_device_matches_single_process(dist_results, case):
    name, kwargs, with_negs = case
    xq, xp, xn = _dist_inputs()
    # Single-process reference on the concatenated batch, with the hand-written loss.
    model = _encoder()
    s = torch.tensor(math.log(1 / kwargs["temperature"]), dtype=torch.float32, requires_grad=True)
    tau = torch.exp(-s.double())
    q, p = _embed(model, xq), _embed(model, xp)
    n = _embed(model, xn) if with_negs else None
    ref = ref_loss_torch(q, p, n, tau=tau, symmetric=kwargs.get("symmetric", False),
                         margin=kwargs.get("false_negative_margin"))
    ref.backward()
    ref_grads = [prm.grad for prm in model.parameters()]
    if kwargs.get("learnable_temperature"):
        ref_grads.append(s.grad)
    # The cross-device batch is really bigger than the local one: the local-only loss differs.
    with torch.no_grad():
        local = ref_loss_math(q[:B_LOCAL], p[:B_LOCAL], None if n is None else n[:B_LOCAL],
                              tau=float(tau), symmetric=kwargs.get("symmetric", False),
                              margin=kwargs.get("false_negative_margin"))
    assert abs(local - ref.item()) > 1e-3
    if kwargs.get("false_negative_margin") is not None:  # the mask is really active on this batch
        with torch.no_grad():
            unmasked = ref_loss_math(q, p, n, tau=float(tau), symmetric=kwargs.get("symmetric", False))
        assert abs(unmasked - ref.item()) > 1e-3
    # The same module, single process, on the concatenated batch (no process group: the gather is identity).
    with torch.no_grad():
        single = ContrastiveLoss(cross_device=True, **kwargs)(q, p, n).item()
    assert abs(single - ref.item()) <= 1e-6
    for rank, res in enumerate(dist_results):
        loss, grads = res[name]
        assert abs(loss - single) <= 1e-6, f"rank {rank}: {loss} vs single-process {single}"
        assert abs(loss - ref.item()) <= 1e-6, f"rank {rank}: {loss} vs reference {ref.item()}"
        assert_grads_close(grads, ref_grads, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# 3. GradCache
# --------------------------------------------------------------------------------------------------------------

N, GC_IN, GC_HID, GC_OUT, GC_K = 32, 12, 24, 8, 2


class _Tower(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(GC_IN, GC_HID), nn.Tanh(), nn.Dropout(0.1), nn.Linear(GC_HID, GC_OUT))

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


def _gc_setup(learnable=True):
    torch.manual_seed(7)
    model = _Tower().to(DT)
    crit = ContrastiveLoss(temperature=0.05, learnable_temperature=learnable, cross_device=False)
    g = torch.Generator().manual_seed(8)
    xq = torch.randn(N, GC_IN, generator=g, dtype=DT)
    xp = torch.randn(N, GC_IN, generator=g, dtype=DT)
    xn = torch.randn(N * GC_K, GC_IN, generator=g, dtype=DT)
    return model, crit, xq, xp, xn


def _split(x, size):
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


def _loss_fn(crit, with_negs):
    if with_negs:
        return lambda q, p, n: crit(q, p, n.view(N, GC_K, -1))
    return lambda q, p: crit(q, p)


def _params(model, crit):
    return list(model.parameters()) + list(crit.parameters())


def _grads(model, crit):
    return [prm.grad.detach().clone() for prm in _params(model, crit)]


@pytest.mark.parametrize("with_negs", [False, True], ids=["pairs", "hard_negatives"])
@pytest.mark.parametrize("chunk", [8, 5])
def test_grad_cache_matches_full_batch_eval(chunk, with_negs):
    """Without dropout (eval mode) the reference is literally one forward of the whole batch per side."""
    model, crit, xq, xp, xn = _gc_setup()
    model.eval()
    inputs = [xq, xp] + ([xn] if with_negs else [])
    # Reference: ordinary full-batch forward + backward with the hand-written loss.
    tau = torch.exp(-crit.log_inv_temperature.double())
    embs = [model(x) for x in inputs]
    ref = ref_loss_torch(embs[0], embs[1], embs[2].view(N, GC_K, -1) if with_negs else None, tau=tau)
    ref.backward()
    ref_grads = _grads(model, crit)
    model.zero_grad()
    crit.zero_grad()

    loss = grad_cache_step(model, [_split(x, chunk) for x in inputs], _loss_fn(crit, with_negs))
    assert not loss.requires_grad
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert_grads_close(_grads(model, crit), ref_grads, rtol=1e-5)


@pytest.mark.parametrize("with_negs", [False, True], ids=["pairs", "hard_negatives"])
@pytest.mark.parametrize("chunk", [8, 5])
def test_grad_cache_matches_full_batch_with_dropout(chunk, with_negs):
    """With dropout the reference has to see the same masks as GradCache's first (no-grad) pass.

    Fair reference: reseed, then run an ordinary forward with a graph over the same chunks in the same order
    (side by side, chunk by chunk) -- this consumes the RNG stream exactly like GradCache's caching pass, so
    every chunk gets the same dropout mask -- concatenate, compute the hand-written loss and back-propagate
    once through the whole graph. That is plain full-batch back-propagation (the chunking only changes how the
    forward is laid out, not the maths), so it is the ground truth GradCache has to reproduce. It shares no
    code with ``grad_cache_step``'s RNG save/restore: if the re-forward did not replay the masks of the first
    pass, the gradients would differ (checked below by breaking the replay). One single forward of all 32 rows
    is not usable here: CPU dropout draws a [32, H] mask differently from four [8, H] masks.
    """
    model, crit, xq, xp, xn = _gc_setup()
    model.train()
    inputs = [xq, xp] + ([xn] if with_negs else [])
    sides = [_split(x, chunk) for x in inputs]

    torch.manual_seed(2024)
    tau = torch.exp(-crit.log_inv_temperature.double())
    embs = [torch.cat([model(c) for c in chunks]) for chunks in sides]
    ref = ref_loss_torch(embs[0], embs[1], embs[2].view(N, GC_K, -1) if with_negs else None, tau=tau)
    ref.backward()
    ref_grads = _grads(model, crit)
    model.zero_grad()
    crit.zero_grad()

    torch.manual_seed(2024)
    loss = grad_cache_step(model, sides, _loss_fn(crit, with_negs))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    got = _grads(model, crit)
    assert_grads_close(got, ref_grads, rtol=1e-5)

    # Dropout is really active: other masks give clearly different gradients ...
    model.zero_grad()
    crit.zero_grad()
    torch.manual_seed(2025)
    tau = torch.exp(-crit.log_inv_temperature.double())
    embs = [torch.cat([model(c) for c in chunks]) for chunks in sides]
    ref_loss_torch(embs[0], embs[1], embs[2].view(N, GC_K, -1) if with_negs else None, tau=tau).backward()
    other = _grads(model, crit)
    assert max((a - b).abs().max().item() for a, b in zip(other[:-1], ref_grads[:-1])) > 1e-3
    # ... and without the mask replay GradCache would be wrong (the test can see a broken replay).
    model.zero_grad()
    crit.zero_grad()
    torch.manual_seed(2024)
    calls = {"n": 0}

    def encode_fresh_masks(chunk_inputs):
        calls["n"] += 1
        if torch.is_grad_enabled():  # re-forward: advance the RNG so the masks differ from the cached pass
            torch.manual_seed(10_000 + calls["n"])
        return model(chunk_inputs)

    grad_cache_step(encode_fresh_masks, sides, _loss_fn(crit, with_negs))
    broken = _grads(model, crit)
    assert max((a - b).abs().max().item() for a, b in zip(broken[:-1], ref_grads[:-1])) > 1e-3


def test_grad_cache_uneven_mixed_chunking_and_unused_side():
    """Different chunk sizes per side, and a side the loss ignores (zero gradient, no crash)."""
    model, crit, xq, xp, xn = _gc_setup(learnable=False)
    model.eval()
    ref = ref_loss_torch(model(xq), model(xp), tau=0.05)
    ref.backward()
    ref_grads = _grads(model, crit)
    model.zero_grad()
    loss = grad_cache_step(model, [_split(xq, 7), _split(xp, 3), _split(xn, 16)], lambda q, p, n: crit(q, p))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert_grads_close(_grads(model, crit), ref_grads, rtol=1e-5)


@pytest.mark.parametrize("chunk", [8, 5])
def test_grad_cache_no_sync_and_backward_hooks(chunk):
    model, crit, xq, xp, _ = _gc_setup()
    model.train()
    sides = [_split(xq, chunk), _split(xp, chunk)]
    n_jobs = sum(len(s) for s in sides)
    state = {"inside": False, "entries": 0, "exits": 0}
    forwards_with_grad, backwards = [], []

    @contextlib.contextmanager
    def no_sync():
        assert not state["inside"]
        state["inside"] = True
        state["entries"] += 1
        try:
            yield
        finally:
            state["inside"] = False
            state["exits"] += 1

    def encode(x):
        if torch.is_grad_enabled():
            forwards_with_grad.append(state["inside"])
        return model(x)

    def backward(t):
        backwards.append(state["inside"])
        t.backward()

    grad_cache_step(encode, sides, _loss_fn(crit, False), backward=backward, no_sync=no_sync)
    assert state["entries"] == n_jobs - 1 == state["exits"]
    # Every re-forward and its backward but the last run inside no_sync; the last one syncs.
    assert forwards_with_grad == [True] * (n_jobs - 1) + [False]
    # The custom backward is used for the loss (first) and once per chunk.
    assert backwards == [False] + [True] * (n_jobs - 1) + [False]
    assert crit.log_inv_temperature.grad is not None  # the loss's own parameter got its gradient


@pytest.mark.parametrize("scale", [1.0, 4.0, 16.0])
def test_grad_cache_applies_a_scaling_backward_once(scale):
    """A ``backward`` that scales what it back-propagates (the 16-mixed GradScaler through manual_backward) must
    leave gradients scaled exactly once, as a plain backward through it would: not scale² (the cached
    embedding gradients must not carry the scale into the re-forwards' backward)."""
    model, crit, xq, xp, _ = _gc_setup(learnable=True)
    model.eval()
    (crit(model(xq), model(xp)) * scale).backward()  # full batch, the loss's temperature included
    ref_grads = _grads(model, crit)
    model.zero_grad()
    crit.zero_grad()
    grad_cache_step(model, [_split(xq, 4), _split(xp, 4)], _loss_fn(crit, False),
                    backward=lambda t: (t * scale).backward())
    assert_grads_close(_grads(model, crit), ref_grads, rtol=1e-5)
