"""Resumable Fisher passes: kill a subprocess mid-pass, resume, get the same Fisher."""

import os
import signal
import subprocess
import sys

import pytest
import torch

from natgrad import estimate_fisher
from natgrad.engine.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import mlp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KW = dict(labels="mc", mc_samples=2, checkpoint_every=2)


def _case():
    torch.manual_seed(0)
    model = mlp((5, 16, 4)).double()
    x = torch.randn(24, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (24,))
    return model, x, y


def _batches(x, y, kill_at=None):
    for i in range(6):
        if i == kill_at:  # a hard kill, as by the OOM killer or a preempted job
            os.kill(os.getpid(), signal.SIGKILL)
        yield x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]


def _child(path, kill_at):
    torch.set_num_threads(1)
    model, x, y = _case()
    gen = torch.Generator().manual_seed(7)
    estimate_fisher(model, _batches(x, y, kill_at), checkpoint=path, generator=gen, **KW)


def test_killed_pass_resumes_to_the_same_fisher(tmp_path):
    path = str(tmp_path / "fisher.ckpt")
    code = f"from tests.engine.test_checkpoint import _child; _child({path!r}, 5)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    saved = load_checkpoint(path)
    assert saved["batches_done"] == 4 and saved["n_samples"] == 16
    # No temp files; the killed pass's lock file stays, but the kernel released its lock.
    assert sorted(os.listdir(tmp_path)) == ["fisher.ckpt", "fisher.ckpt.lock"]

    model, x, y = _case()
    resumed = estimate_fisher(
        model, _batches(x, y), checkpoint=path, generator=torch.Generator().manual_seed(7), **KW
    )
    whole = estimate_fisher(model, _batches(x, y), generator=torch.Generator().manual_seed(7), **KW)
    assert resumed.n_samples == whole.n_samples == 24
    for k in whole:
        assert torch.equal(resumed[k], whole[k]), k
    # A finished pass rerun with the same arguments returns the saved result.
    again = estimate_fisher(
        model, _batches(x, y), checkpoint=path, generator=torch.Generator().manual_seed(7), **KW
    )
    assert all(torch.equal(again[k], whole[k]) for k in whole)


def test_different_run_is_refused(tmp_path):
    path = str(tmp_path / "f.ckpt")
    model, x, y = _case()
    estimate_fisher(model, (x, y), checkpoint=path)
    with pytest.raises(ValueError, match=r"different Fisher pass: options \(labels\).*delete"):
        estimate_fisher(model, (x, y), checkpoint=path, labels="exact")
    with torch.no_grad():
        model[0].weight.add_(1.0)
    with pytest.raises(ValueError, match=r"parameter values \(0.weight\)"):
        estimate_fisher(model, (x, y), checkpoint=path)


def test_bad_arguments_and_foreign_files(tmp_path):
    model, x, y = _case()
    with pytest.raises(ValueError, match="Invalid checkpoint_every: 0; it must be an integer >= 1"):
        estimate_fisher(model, (x, y), checkpoint=str(tmp_path / "a"), checkpoint_every=0)
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable natgrad Fisher checkpoint"):
        estimate_fisher(model, (x, y), checkpoint=str(junk))
    torch.save({"format": 99}, tmp_path / "other.ckpt")
    with pytest.raises(ValueError, match="is not a natgrad Fisher checkpoint"):
        estimate_fisher(model, (x, y), checkpoint=str(tmp_path / "other.ckpt"))


def test_save_is_atomic_on_failure(tmp_path):
    path = tmp_path / "s.ckpt"
    save_checkpoint(path, {"n": 1})

    class Bad:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        save_checkpoint(path, {"n": Bad()})
    assert load_checkpoint(path)["n"] == 1  # the old checkpoint survives
    assert os.listdir(tmp_path) == ["s.ckpt"]
