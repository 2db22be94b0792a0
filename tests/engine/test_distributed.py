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
