"""``source="backward"`` with ``num_items_in_batch`` under DistributedDataParallel (2 gloo
processes): the warning about the Hugging Face Trainer's
``average_tokens_across_devices=True`` (a count of all processes, each loss multiplied by
their number ``P``: a curvature ``P²`` too large) fires once, on rank 0, and only when the
count is not the process's own.

Each rank plays the Trainer's step by hand: two micro-batches of token labels (some
``-100``), the model dividing its summed loss by ``num_items_in_batch``; with the count of
all processes the loss is multiplied by ``P``, as the Trainer does.
"""

from __future__ import annotations

import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import natgrad
from tests.multiprocess import run_ranks

WORLD = 2
PROCESSES = "average_tokens_across_devices=False"


class TokenModel(nn.Module):
    """A token classifier whose loss is its summed cross-entropy over the kept labels
    divided by ``num_items_in_batch``, as Hugging Face models compute it."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 5), nn.Linear(5, 4)

    def forward(self, input_ids, labels, num_items_in_batch):
        logits = self.head(torch.tanh(self.emb(input_ids)))
        total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                reduction="sum")
        return total / num_items_in_batch


def _micro_batches(rank):
    g = torch.Generator().manual_seed(10 + rank)
    out = []
    for i in range(2):
        ids = torch.randint(0, 11, (3, 4), generator=g)
        labels = torch.randint(0, 4, (3, 4), generator=g)
        labels[0, rank + i + 1 :] = -100  # padding: another count on each rank
        out.append((ids, labels))
    return out


def _step(rank, world, all_processes):
    """One Trainer-like step; the recorded diagonal and the warnings it gave."""
    torch.manual_seed(0)
    model = TokenModel().double()
    net = DistributedDataParallel(model)
    pre = natgrad.FisherPreconditioner(model, kind="diag", source="backward",
                                       loss_reduction="token_mean", kl_clip=None)
    opt = natgrad.NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1), pre)
    batches = _micro_batches(rank)
    count = sum(labels.ne(-100).sum() for _, labels in batches)
    if all_processes:
        dist.all_reduce(count)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for i, (ids, labels) in enumerate(batches):
            with net.no_sync() if i == 0 else torch.enable_grad():
                loss = net(input_ids=ids, labels=labels, num_items_in_batch=count)
                (loss * world if all_processes else loss).backward()
        opt.step()
    diag = {k: v.clone() for k, v in pre.curvature.diagonal().items()}
    pre.close()
    return diag, [str(w.message) for w in caught]


def _worker(rank, world, init_file, folder):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        res = {name: _step(rank, world, flag) for name, flag in (("own", False), ("all", True))}
        torch.save(res, os.path.join(folder, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp_items")
    run_ranks(_worker, WORLD, str(folder))
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_count_of_all_processes_warns_once_on_rank_zero(ranks):
    said = [[m for m in r["all"][1] if PROCESSES in m] for r in ranks]
    assert len(said[0]) == 1 and "2² too large" in said[0][0], said
    assert said[1] == [], said  # not on every rank


def test_own_count_does_not_warn(ranks):
    """average_tokens_across_devices=False: the count is the process's own (exact)."""
    assert all(not [m for m in r["own"][1] if PROCESSES in m] for r in ranks)


def test_the_warned_factor_is_the_curvatures(ranks):
    """What the warning says: the count of all processes gives P² the own count's curvature."""
    for r in ranks:
        own, every = r["own"][0], r["all"][0]
        for k in own:
            torch.testing.assert_close(every[k], WORLD**2 * own[k], rtol=1e-10, atol=1e-14)
