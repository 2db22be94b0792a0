"""Faults under torch.distributed: an error on one rank reaches every rank at once, and
``estimate_fisher(distributed=...)`` makes the collective explicit.

One 2-process gloo run (a few seconds) plays every scenario in order; the tests read
what each rank recorded.
"""

from __future__ import annotations

import datetime
import logging
import os
import time

import pytest
import torch
import torch.distributed as dist

import natgrad
from natgrad import estimate_fisher
from tests.multiprocess import run_ranks
from tests.reference import assert_close_dict

WORLD = 2
TIMEOUT_S = 30  # the process group's timeout: a hang shows as an error after this long


def _case():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))
    model = model.double()
    x = torch.randn(10, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    return model, x, y


def _shard(x, y, rank):
    # Uneven shards: rank 0 has 3 samples in 2 batches, rank 1 has 7 in 2 batches.
    if rank == 0:
        return [(x[:2], y[:2]), (x[2:3], y[2:3])]
    return [(x[3:6], y[3:6]), (x[6:], y[6:])]


def _attempt(fn):
    t0 = time.perf_counter()
    try:
        out = fn()
        return {"ok": True, "value": out, "seconds": time.perf_counter() - t0}
    except Exception as exc:  # recorded for the test to assert on
        return {
            "ok": False,
            "type": type(exc).__name__,
            "message": str(exc),
            "cause": str(exc.__cause__) if exc.__cause__ is not None else None,
            "seconds": time.perf_counter() - t0,
        }


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _worker(rank, world, init_file, folder):
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=TIMEOUT_S),
    )
    handler = _Records()
    log = logging.getLogger("natgrad")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    res = {}
    try:
        model, x, y = _case()
        data = _shard(x, y, rank)
        fisher = lambda f: (dict(f), f.n_samples)  # noqa: E731

        # 1. automatic (distributed=None): the sums of every rank, one log line per process
        res["auto"] = _attempt(lambda: fisher(estimate_fisher(model, data)))
        res["auto_again"] = _attempt(lambda: fisher(estimate_fisher(model, data)))
        res["log"] = list(handler.messages)

        # 2. a bad batch on rank 1 only (7 features for a model that takes 5): both ranks
        #    raise the same named error at once
        bad = list(data)
        if rank == 1:
            bad[1] = (torch.randn(4, 7, dtype=torch.float64), data[1][1])
        res["bad_batch"] = _attempt(lambda: estimate_fisher(model, bad))

        # 2b. a label out of range on rank 1 only (the audit's case)
        labels = [(b[0], b[1].clone()) for b in data]
        if rank == 1:
            labels[1][1][2] = 99
        res["bad_label"] = _attempt(lambda: estimate_fisher(model, labels))

        # 3. still usable afterwards: distributed=True gives the global Fisher
        res["required"] = _attempt(lambda: fisher(estimate_fisher(model, data, distributed=True)))

        # 4. distributed=False on rank 0 alone: its local Fisher, no collective (no hang)
        if rank == 0:
            res["local"] = _attempt(lambda: fisher(estimate_fisher(model, data, distributed=False)))
        dist.barrier()

        # 5. an unreadable checkpoint on rank 0 only: every rank raises
        path = os.path.join(folder, f"ckpt{rank}")
        if rank == 0:
            with open(path, "wb") as fh:
                fh.write(b"junk")
        res["bad_checkpoint"] = _attempt(lambda: estimate_fisher(model, data, checkpoint=path))

        # 6. a good checkpointed pass per rank (rank and world size in its fingerprint)
        good = os.path.join(folder, f"good{rank}.ckpt")
        res["checkpointed"] = _attempt(
            lambda: fisher(estimate_fisher(model, data, checkpoint=good))
        )
    finally:
        torch.save(res, os.path.join(folder, f"rank{rank}.pt"))
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dist")
    run_ranks(_worker, WORLD, str(folder))
    out = [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    return out, folder


def _reference(local_rank=None):
    model, x, y = _case()
    if local_rank is not None:
        return estimate_fisher(model, _shard(x, y, local_rank), distributed=False)
    return estimate_fisher(model, (x, y))


def _assert_global(entry):
    assert entry["ok"], entry
    got, n = entry["value"]
    ref = _reference()
    assert n == 10
    assert all(v.dtype == torch.float64 for v in got.values())  # float64 model, float64 sums
    assert_close_dict(got, dict(ref), rtol=1e-12, atol=1e-15)


def test_error_on_one_rank_reaches_every_rank_at_once(ranks):
    out, _ = ranks
    for r in range(WORLD):
        e = out[r]["bad_batch"]
        assert not e["ok"]
        assert e["type"] == "DistributedError", e
        assert "rank 1 of 2" in e["message"], e["message"]
        assert e["seconds"] < TIMEOUT_S / 3, e  # at once, not at the group's timeout
    assert out[0]["bad_batch"]["message"] == out[1]["bad_batch"]["message"]
    original = out[1]["bad_batch"]["cause"]  # rank 1 chains its own error ...
    assert original and original in out[0]["bad_batch"]["message"]  # ... which rank 0 shows


def test_bad_label_on_one_rank_reaches_every_rank(ranks):
    out, _ = ranks
    for r in range(WORLD):
        e = out[r]["bad_label"]
        assert not e["ok"] and e["type"] == "DistributedError", e
        assert "rank 1 of 2" in e["message"] and "99" in e["message"], e["message"]
        assert e["seconds"] < TIMEOUT_S / 3, e


def test_ranks_stay_usable_after_a_failed_pass(ranks):
    out, _ = ranks
    for r in range(WORLD):
        _assert_global(out[r]["required"])


def test_automatic_mode_sums_over_ranks_and_logs_once(ranks):
    out, _ = ranks
    for r in range(WORLD):
        _assert_global(out[r]["auto"])
        _assert_global(out[r]["auto_again"])
        lines = [m for m in out[r]["log"] if "distributed" in m]
        assert len(lines) == 1, out[r]["log"]
        assert "world size 2" in lines[0] and "distributed=False" in lines[0]


def test_local_mode_on_one_rank_does_not_hang(ranks):
    out, _ = ranks
    e = out[0]["local"]
    assert e["ok"], e
    got, n = e["value"]
    ref = _reference(local_rank=0)
    assert n == 3
    assert_close_dict(got, dict(ref), rtol=1e-12, atol=1e-15)  # same local pass


def test_checkpoint_error_on_one_rank_reaches_every_rank(ranks):
    out, _ = ranks
    for r in range(WORLD):
        e = out[r]["bad_checkpoint"]
        assert not e["ok"] and e["type"] == "DistributedError", e
        assert "rank 0 of 2" in e["message"] and "checkpoint" in e["message"]


def test_rank_checkpoint_reused_by_one_process_is_refused(ranks):
    out, folder = ranks
    for r in range(WORLD):
        _assert_global(out[r]["checkpointed"])
    model, x, y = _case()
    with pytest.raises(natgrad.CheckpointMismatchError, match=r"rank.*world size|world size"):
        estimate_fisher(model, _shard(x, y, 1), checkpoint=str(folder / "good1.ckpt"))


def test_required_without_a_process_group_is_refused():
    model, x, y = _case()
    with pytest.raises(
        RuntimeError, match=r"distributed=True.*not initialized.*init_process_group"
    ):
        estimate_fisher(model, (x, y), distributed=True)


@pytest.mark.parametrize("value", ["yes", 1])
def test_distributed_argument_must_be_none_or_bool(value):
    model, x, y = _case()
    with pytest.raises(TypeError, match=r"distributed must be None, True or False"):
        estimate_fisher(model, (x, y), distributed=value)


def test_without_a_process_group_auto_and_local_agree():
    model, x, y = _case()
    a = estimate_fisher(model, (x, y))
    b = estimate_fisher(model, (x, y), distributed=False)
    assert all(torch.equal(a[k], b[k]) for k in a)
