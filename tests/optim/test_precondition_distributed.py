"""FisherPreconditioner under DistributedDataParallel (2 and 3 gloo processes on CPU): for
every kind, the replicas stay bit-identical over 10 steps, and equal one process training
on the union of the ranks' batches (to 1e-6)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from natgrad import FisherPreconditioner, NaturalGradient
from tests.multiprocess import run_ranks

STEPS, PER_RANK = 10, 4
# (kind, options): every registered kind; K-FAC both solves and both sources
CASES = {
    "diag": ("diag", {}),
    "kfac_factored": ("kfac", {}),
    "kfac_exact": ("kfac", {"kfac_damping": "exact"}),
    "ekfac": ("ekfac", {}),
    "lowrank": ("lowrank", {}),
    "kfac_backward": ("kfac", {"source": "backward", "kfac_damping": "exact"}),
    "diag_backward": ("diag", {"source": "backward"}),
    "ekfac_backward": ("ekfac", {"source": "backward"}),
    "lowrank_backward": ("lowrank", {"source": "backward"}),
}


def _model():
    torch.manual_seed(0)
    # 3 K-FAC layers, so that 2 and 3 ranks each own at least one eigendecomposition
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(),
                         nn.Linear(6, 3)).double()


def _data(world):
    g = torch.Generator().manual_seed(1)
    n = world * PER_RANK
    xs = [torch.randn(n, 5, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    ys = [torch.randint(0, 3, (n,), generator=g) for _ in range(STEPS)]
    return xs, ys


def _train(model, net, kind, opts, xs, ys, shard):
    pre = FisherPreconditioner(model, kind=kind, damping=0.05, update_every=2, **opts)
    opt = NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), pre)
    for x, y in zip(xs, ys, strict=True):
        x, y = x[shard], y[shard]

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        if pre.source == "backward":
            opt.step(closure)
        else:
            opt.step(closure, batch=(x, y))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        xs, ys = _data(world)
        shard = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        res = {}
        # the eigendecompositions are spread: this rank decomposes only layers i ≡ rank
        calls = []
        eigh = torch.linalg.eigh

        def counting_eigh(M, *a, **k):
            calls.append(tuple(M.shape))
            return eigh(M, *a, **k)

        torch.linalg.eigh = counting_eigh
        try:
            model = _model()
            _train(model, nn.parallel.DistributedDataParallel(model), "kfac",
                   {"kfac_damping": "exact"}, xs[:1], ys[:1], shard)
        finally:
            torch.linalg.eigh = eigh
        res["eigh_calls"] = calls
        for name, (kind, opts) in CASES.items():
            model = _model()
            ddp = nn.parallel.DistributedDataParallel(model)  # averages the gradients
            res[name] = _train(model, ddp, kind, opts, xs, ys, shard)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_replicas_identical_and_equal_one_process_on_union(world, tmp_path):
    run_ranks(_worker, world, str(tmp_path))
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    xs, ys = _data(world)
    torch.set_num_threads(1)
    # layer i (of 3: A 6x6/8x8/7x7 with bias column) is decomposed on rank i mod world only
    owned = {r: [] for r in range(world)}
    for i, shape in enumerate([(1, 6, 6), (1, 8, 8), (1, 7, 7)]):
        owned[i % world].append(shape)
    for r in range(world):
        calls = got[r]["eigh_calls"]
        assert sorted(calls[::2]) == sorted(owned[r]), (r, calls)  # A, then G, per layer
    for name, (kind, opts) in CASES.items():
        for r in range(1, world):  # bit-identical replicas
            for k, v in got[0][name].items():
                assert torch.equal(v, got[r][name][k]), (name, r, k)
        model = _model()
        ref = _train(model, model, kind, opts, xs, ys, slice(None))
        start = _model().state_dict()
        for k, v in ref.items():
            assert not torch.equal(v, start[k]), (name, k)  # it trained
            torch.testing.assert_close(got[0][name][k], v, rtol=1e-6, atol=1e-8,
                                       msg=f"{name} {k}")
