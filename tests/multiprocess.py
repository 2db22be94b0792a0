"""One way to run a test's gloo ranks: children forked from a clean fork server.

A child forked straight from the pytest process inherits whatever threads and locks that
process holds after hundreds of tests, and can deadlock (a CI run hung this way). The fork
server is a fresh single-threaded process, started once, that has already imported torch,
its compiler stack (DDP's first construction imports it, seconds per spawned process) and
natgrad; every rank is forked from it. A rank that does not finish within ``timeout``
seconds is killed and the test fails, naming the ranks still running.
"""

from __future__ import annotations

import multiprocessing
import time

import torch.multiprocessing as mp

_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "natgrad"]
multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)


def run_ranks(worker, world, *args, timeout=300.0):
    """Run ``worker(rank, world, *args)`` on ``world`` processes and wait for all of them."""
    ctx = mp.start_processes(worker, args=(world, *args), nprocs=world, join=False,
                             start_method="forkserver")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):  # raises ProcessRaisedException if a rank failed
        if time.monotonic() > deadline:
            alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise AssertionError(f"ranks {alive} of {world} still running after {timeout} s "
                                 "(a collective that never completed?)")
