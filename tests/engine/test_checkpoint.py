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
    with pytest.raises(ValueError, match=r"parameter values or dtypes \(0.weight\)"):
        estimate_fisher(model, (x, y), checkpoint=path)


class _Interrupt(Exception):
    pass


def _stopped_after(x, y, k):
    for i in range(6):
        if i == k:
            raise _Interrupt
        yield x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]


def _bn_case():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.BatchNorm1d(6), torch.nn.Tanh(),
                                torch.nn.Linear(6, 4)).double().eval()
    x = torch.randn(24, 5, dtype=torch.float64)
    return model, x, torch.randint(0, 4, (24,))


@pytest.mark.parametrize("change", ["tiny_weight", "dtype", "buffers", "output_fn", "custom_nll"])
def test_a_resume_after_any_change_of_the_run_is_refused(tmp_path, change):
    """An interrupted pass resumed after a change its fingerprint missed was mixed into the
    new one (found by review): a weight change below 1e-6 (a rounded checksum), a cast to
    another dtype, changed BatchNorm statistics, another output_fn, another custom nll."""
    import natgrad

    path = str(tmp_path / "f.ckpt")
    model, x, y = _bn_case()
    xs = x.float() if change == "dtype" else x
    if change == "dtype":
        model = model.float()
    lik = natgrad.CustomLikelihood(lambda f, t: torch.nn.functional.cross_entropy(
        f, t, reduction="none"))
    kw = {"likelihood": lik} if change == "custom_nll" else {}
    with pytest.raises(_Interrupt):
        estimate_fisher(model, _stopped_after(xs, y, 3), checkpoint=path, checkpoint_every=1,
                        **kw)
    if change == "tiny_weight":
        with torch.no_grad():
            model[0].weight[0, 0] += 1e-9
    elif change == "dtype":
        model = model.double()
    elif change == "buffers":
        model[1].running_mean += 0.5
    elif change == "output_fn":
        kw = {"output_fn": lambda o: 2 * o}
    else:
        kw = {"likelihood": natgrad.CustomLikelihood(
            lambda f, t: 2 * torch.nn.functional.cross_entropy(f, t, reduction="none"))}
    what = {"tiny_weight": "parameter values or dtypes", "dtype": "parameter values or dtypes",
            "buffers": "buffers", "output_fn": "options", "custom_nll": "options"}[change]
    with pytest.raises(ValueError, match=f"different Fisher pass: {what}"):
        estimate_fisher(model, _stopped_after(x, y, None), checkpoint=path, **kw)


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
