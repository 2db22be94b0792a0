"""One way to run a test's gloo ranks: children forked from a clean fork server.

A child forked straight from the pytest process inherits whatever threads and locks that
process holds after hundreds of tests, and can deadlock (a CI run hung this way). The fork
server is a fresh single-threaded process, started once, that has already imported torch,
its compiler stack (DDP's first construction imports it, seconds per spawned process) and
natgrad; every rank is forked from it.

A rank that does not finish within ``timeout`` seconds is killed, with every rank's Python
stack (dumped by ``faulthandler`` shortly before the deadline) in the message. One CI run
had one rank of three hang after the other two had finished (so after every collective),
and never in 65 local repeats of that test (40 of them with the cores overloaded); so a timed-out
run is retried once, from a fresh rendezvous file, with the stacks in a warning, and the
test fails only if the retry times out too (or any rank raises, at any attempt).
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import tempfile
import time
import warnings

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


def _attempt(worker, world, args, timeout):
    """One run of every rank; None when all finished, else the timeout's description."""
    with tempfile.TemporaryDirectory() as scratch:
        init_file = os.path.join(scratch, "init")  # a fresh rendezvous per attempt
        ctx = mp.start_processes(
            _traced, args=(worker, world, scratch, timeout - 5.0, init_file, *args),
            nprocs=world, join=False, start_method="forkserver")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):  # raises ProcessRaisedException if a rank failed
            if time.monotonic() > deadline:
                alive = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
                stacks = []
                for r in range(world):
                    with open(os.path.join(scratch, f"rank{r}.txt")) as f:
                        text = f.read() or ("(returned from the worker, stuck at process exit)"
                                            if r in alive else "(finished)")
                    stacks.append(f"--- rank {r} ---\n{text}")
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                return (f"ranks {alive} of {world} still running after {timeout} s "
                        "(a collective that never completed?); their stacks:\n" + "\n".join(stacks))
    return None


def run_ranks(worker, world, *args, timeout=150.0):
    """Run ``worker(rank, world, init_file, *args)`` on ``world`` processes, wait for all.

    ``init_file`` is a fresh path for ``init_process_group(init_method=f"file://{init_file}")``.
    """
    hang = _attempt(worker, world, args, timeout)
    if hang is None:
        return
    warnings.warn(f"gloo ranks timed out; retrying once. {hang}", RuntimeWarning, stacklevel=2)
    hang = _attempt(worker, world, args, timeout)
    if hang is not None:
        raise AssertionError(hang)
