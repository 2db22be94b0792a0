"""One way to run a test's gloo ranks: children forked from a clean fork server.

A child forked straight from the pytest process inherits whatever threads and locks that
process holds after hundreds of tests, and can deadlock (a CI run hung this way). The fork
server is a fresh single-threaded process, started once, that has already imported torch,
its compiler stack (DDP's first construction imports it, seconds per spawned process) and
natgrad; every rank is forked from it. A rank that does not finish within ``timeout``
seconds is killed and the test fails, naming the ranks still running and showing where
each of them was (every rank's Python stacks, dumped by ``faulthandler`` shortly before
the deadline).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import tempfile
import time

import torch.multiprocessing as mp

_PRELOAD = ["torch", "torch.distributed", "torch._dynamo", "natgrad"]
multiprocessing.get_context("forkserver").set_forkserver_preload(_PRELOAD)


def _traced(rank, worker, world, stack_dir, dump_after, *args):
    """Run one rank with a timed stack dump armed (written only if the rank is still alive)."""
    with open(os.path.join(stack_dir, f"rank{rank}.txt"), "w") as f:
        faulthandler.dump_traceback_later(dump_after, exit=False, file=f)
        try:
            worker(rank, world, *args)
        finally:
            faulthandler.cancel_dump_traceback_later()


def run_ranks(worker, world, *args, timeout=300.0):
    """Run ``worker(rank, world, *args)`` on ``world`` processes and wait for all of them."""
    with tempfile.TemporaryDirectory() as stack_dir:
        ctx = mp.start_processes(_traced, args=(worker, world, stack_dir, timeout - 5.0, *args),
                                 nprocs=world, join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):  # raises ProcessRaisedException if a rank failed
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                stacks = []
                for r in range(world):
                    with open(os.path.join(stack_dir, f"rank{r}.txt")) as f:
                        text = f.read() or ("(returned from the worker, stuck at process exit)"
                                            if r in alive else "(finished)")
                    stacks.append(f"--- rank {r} ---\n{text}")
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                raise AssertionError(f"ranks {alive} of {world} still running after {timeout} s "
                                     "(a collective that never completed?); their stacks:\n"
                                     + "\n".join(stacks))
