"""Structured curvatures under torch.distributed: 2 gloo processes against one process.

Each rank passes its own (uneven, multi-batch) shard. ``estimate`` reduces the
statistics (EKFAC: its factors before the eigenbasis re-fit), so every rank must hold the
curvature one process computes on the union batch. ``all_reduce`` of local estimates
(``distributed=False``) must equal ``+`` over the shards in one process (for K-FAC and
low rank that is the union estimate too). A rank with an empty shard still takes part.
"""

import os

import torch
import torch.distributed as dist
from torch import nn

import natgrad
from tests.multiprocess import run_ranks
from tests.reference import dense_from_mv

KINDS = ("kfac", "ekfac", "lowrank")


def _case():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3), nn.Tanh(), nn.Linear(3, 3)).double()
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    return model, x, y


def _shards(x, y, rank):
    if rank == 0:
        return [(x[:2], y[:2]), (x[2:3], y[2:3])]
    return [(x[3:6], y[3:6]), (x[6:], y[6:])]


def _est(model, data, kind, **kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return natgrad.estimate_curvature(model, data, kind=kind, **kw)


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, x, y = _case()
        res = {}
        for kind in KINDS:
            shard = _shards(x, y, rank)
            glob = _est(model, shard, kind)
            local = _est(model, shard, kind, distributed=False)
            red = local.all_reduce()
            # a rank with no data still takes part in every collective
            lone = _est(model, [] if rank == 0 else [(x, y)], kind)
            res[kind] = (glob.state_dict(), red.state_dict(), local.n_samples, lone.state_dict())
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_union(tmp_path):
    run_ranks(_worker, 2, str(tmp_path))
    model, x, y = _case()
    shapes = {k: p.shape for k, p in model.named_parameters()}
    for kind in KINDS:
        cls = natgrad.CURVATURE_KINDS[kind]
        union = dense_from_mv(_est(model, (x, y), kind), shapes)
        parts = [_est(model, _shards(x, y, r), kind) for r in range(2)]
        summed = dense_from_mv(parts[0] + parts[1], shapes)
        dense = {}
        for rank in range(2):
            glob, red, n_local, lone = torch.load(tmp_path / f"rank{rank}.pt")[kind]
            lone = cls.from_state_dict(lone)
            assert lone.n_samples == 10
            torch.testing.assert_close(dense_from_mv(lone, shapes), union, rtol=1e-6, atol=1e-9)
            assert n_local == (3 if rank == 0 else 7)
            g, r = cls.from_state_dict(glob), cls.from_state_dict(red)
            assert g.n_samples == r.n_samples == 10
            dense[rank] = (dense_from_mv(g, shapes), dense_from_mv(r, shapes))
            torch.testing.assert_close(dense[rank][0], union, rtol=1e-6, atol=1e-9)
            torch.testing.assert_close(dense[rank][1], summed, rtol=1e-6, atol=1e-9)
            if kind != "ekfac":  # pooled factors / stacked rows: all_reduce is the union too
                torch.testing.assert_close(dense[rank][1], union, rtol=1e-6, atol=1e-9)
        # the replicas agree exactly
        torch.testing.assert_close(dense[0][0], dense[1][0], atol=0, rtol=0)
        torch.testing.assert_close(dense[0][1], dense[1][1], atol=0, rtol=0)
