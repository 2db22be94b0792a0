"""Distributed estimation: 2 gloo processes on CPU against one process on all the data."""

import os

import pytest
import torch
import torch.distributed as dist

from natgrad import estimate_fisher
from natgrad.engine.distributed import all_reduce_sums, is_distributed
from tests.conftest import TinyCNN
from tests.multiprocess import run_ranks
from tests.reference import assert_close_dict


def _case():
    torch.manual_seed(0)
    model = TinyCNN().double()
    x = torch.randn(10, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    return model, x, y


def _shards(x, y, rank):
    # Uneven shards: rank 0 gets 3 samples in 2 batches, rank 1 gets 7 in 2 batches.
    if rank == 0:
        return [(x[:2], y[:2]), (x[2:3], y[2:3])]
    return [(x[3:6], y[3:6]), (x[6:], y[6:])]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, x, y = _case()
        res = {}
        for labels in ("empirical", "exact"):
            F = estimate_fisher(model, _shards(x, y, rank), labels=labels)
            res[labels] = (dict(F), F.n_samples)
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process(tmp_path):
    run_ranks(_worker, 2, str(tmp_path))
    model, x, y = _case()
    for labels in ("empirical", "exact"):
        ref = estimate_fisher(model, (x, y), labels=labels)
        for rank in range(2):
            got, n = torch.load(tmp_path / f"rank{rank}.pt")[labels]
            assert n == 10
            assert_close_dict(got, dict(ref), rtol=1e-6, atol=1e-10)


def test_not_distributed_is_identity():
    assert not is_distributed()
    s = {"a": torch.arange(3.0)}
    out, n = all_reduce_sums(s, 4)
    assert n == 4 and torch.equal(out["a"], s["a"])


def test_empty_local_data_still_raises_without_a_group():
    model, _, _ = _case()
    with pytest.raises(ValueError, match="No samples"):
        estimate_fisher(model, [])


def _disagree_worker(rank, world, init_file, out_dir):
    """Ranks that disagree, fail alone or share one MC stream: every rank records what it
    raised or warned (found by review: mixed sums, gloo aborts, hangs, common labels)."""
    import warnings

    import torch.nn.functional as F

    import natgrad

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    out = {}
    try:
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
                                    torch.nn.Linear(3, 3)).double()
        x = torch.randn(6, 4, dtype=torch.float64)
        y = torch.randint(0, 3, (6,))
        cases = {
            "params": lambda: natgrad.estimate_fisher(
                model, (x, y), params=["0.weight" if rank == 0 else "2.weight"]),
            "labels": lambda: natgrad.estimate_curvature(
                model, (x, y), kind="kfac", labels="empirical" if rank == 0 else "exact"),
            "setup": lambda: natgrad.estimate_curvature(  # fails before the pass on rank 1
                model, (x, y), kind="kfac", params=["0.weight" if rank == 0 else "nope.weight"]),
            "dtype": lambda: natgrad.estimate_curvature(
                model if rank == 0 else model.float(), (x if rank == 0 else x.float(), y),
                kind="lowrank"),
        }
        model.double()
        for name, call in cases.items():
            try:
                call()
                out[name] = "returned"
            except natgrad.DistributedError as exc:
                out[name] = str(exc)
            model.double()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            natgrad.estimate_fisher(model, (x, y), labels="mc",
                                    generator=torch.Generator().manual_seed(3))
            out["same_stream"] = [str(m.message) for m in w]
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            F_default = natgrad.estimate_fisher(model, (x, y), labels="mc")  # rank-seeded
            out["default_stream"] = [str(m.message) for m in w if "same state" in str(m.message)]
        out["default_fisher"] = dict(F_default)
        pre = natgrad.FisherPreconditioner(model, source="backward", kind="diag",
                                           update_every=1, kl_clip=None)
        if rank == 0:  # rank 1 records nothing: its refresh fails before the all-reduce
            F.cross_entropy(model(x), y).backward()
        else:
            for p in model.parameters():
                p.grad = torch.ones_like(p)
        try:
            pre.step()
            out["norecord"] = "returned"
        except natgrad.DistributedError as exc:
            out["norecord"] = str(exc)
        # a framework's resume: rank 0's state loaded on every rank keeps the draws apart
        states = [None, None]
        dist.all_gather_object(states, pre.state_dict())
        pre.load_state_dict(states[0])
        out["resumed_generator"] = pre.generator.get_state()
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ranks_that_disagree_or_fail_alone_raise_on_every_rank(tmp_path):
    run_ranks(_disagree_worker, 2, str(tmp_path), timeout=120.0)
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert "do not compute the same thing" in out["params"] and "2.weight" in out["params"]
        assert "labels: 'empirical'" in out["labels"] and "labels: 'exact'" in out["labels"]
        assert "torch.float32" in out["dtype"]
        assert "failed on rank 1" in out["setup"] and "nope.weight" in out["setup"]
        assert any("draw correlated Monte Carlo labels" in m for m in out["same_stream"])
        assert out["default_stream"] == []
        assert "found no recorded forward" in out["norecord"] and "rank 1" in out["norecord"]
    g0, g1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False)["resumed_generator"]
              for r in range(2))
    assert not torch.equal(g0, g1)
    # the default generators differ by rank: the pooled MC Fisher is not one rank's
    a = torch.load(tmp_path / "rank0.pt", weights_only=False)["default_fisher"]
    b = torch.load(tmp_path / "rank1.pt", weights_only=False)["default_fisher"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # every rank holds the pooled result
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(),
                                torch.nn.Linear(3, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    local = estimate_fisher(model, x, labels="mc")  # seed 0: what every rank drew before
    assert not all(torch.allclose(a[k], local[k]) for k in a)
