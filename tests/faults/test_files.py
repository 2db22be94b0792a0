"""Faults in files: Fisher files, resumable checkpoints and the command's output folder.

Each case asserts the exception type and a phrase of its message, or the exact result
against a reference (the values that were saved, an uninterrupted pass).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys

import pytest
import torch

import natgrad
from natgrad import DiagonalFisher, estimate_fisher
from tests.conftest import mlp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- helpers: the safetensors layout (8-byte header length, JSON header, data) ----------------
def _read(path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def _write(path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)


def _header(path) -> tuple[int, dict]:
    raw = _read(path)
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _flip(path, offsets) -> None:
    """Flip every bit of the bytes at ``offsets`` of the data region (after the header)."""
    n, _ = _header(path)
    raw = bytearray(_read(path))
    for o in offsets:
        raw[8 + n + o] ^= 0xFF
    _write(path, bytes(raw))


def _meta_checksum(meta) -> str:
    """The metadata checksum, computed here independently of natgrad: SHA-256 of the JSON
    of every other entry, keys sorted."""
    body = json.dumps({k: meta[k] for k in sorted(meta) if k != "meta_sha256"})
    return hashlib.sha256(body.encode()).hexdigest()


def _rewrite_meta(path, edit, *, reseal=True) -> None:
    """Apply ``edit(metadata)`` and write the file back (a valid safetensors file); with
    ``reseal``, the metadata checksum is recomputed (a consistent edit, so that the
    checks behind it are reached)."""
    n, head = _header(path)
    data = _read(path)[8 + n :]
    meta = dict(head.get("__metadata__", {}))
    edit(meta)
    if reseal and "meta_sha256" in meta:
        meta["meta_sha256"] = _meta_checksum(meta)
    head["__metadata__"] = meta
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    _write(path, struct.pack("<Q", len(text)) + text + data)


def _digest(t: torch.Tensor) -> str:
    """SHA-256 of a tensor's raw bytes, computed here independently of natgrad."""
    return hashlib.sha256(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _craft(path, tensors: dict, n_samples="5") -> None:
    """A Fisher file whose checksums are right but whose values may be bad (NaN, < 0, int)."""
    from safetensors.torch import save_file

    dname = {torch.float32: "float32", torch.float64: "float64", torch.int32: "int32"}
    meta = {
        "format": "natgrad.DiagonalFisher",
        "format_version": "2",
        "natgrad_version": natgrad.__version__,
        "n_samples": n_samples,
        "labels": "empirical",
        "likelihood": "categorical",
        "names": json.dumps(list(tensors)),
        "shapes": json.dumps({k: list(v.shape) for k, v in tensors.items()}),
        "dtypes": json.dumps({k: dname[v.dtype] for k, v in tensors.items()}),
        "sha256": json.dumps({k: _digest(v) for k, v in tensors.items()}),
    }
    save_file(tensors, str(path), metadata=meta)


def _fisher(dtype=torch.float32) -> DiagonalFisher:
    g = torch.Generator().manual_seed(0)
    vals = {
        "0.weight": torch.rand(16, 5, generator=g, dtype=torch.float64).to(dtype),
        "0.bias": torch.rand(16, generator=g, dtype=torch.float64).to(dtype),
        "2.weight": torch.rand(4, 16, generator=g, dtype=torch.float64).to(dtype),
    }
    return DiagonalFisher(vals, 37, labels="mc", likelihood="categorical")


def _saved(tmp_path, dtype=torch.float32):
    f = _fisher(dtype)
    path = tmp_path / "f.safetensors"
    f.save(path)
    return f, path


# -- Fisher files: round trip, checksums, bad values, bad metadata ---------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    f, path = _saved(tmp_path, dtype)
    g = DiagonalFisher.load(path)
    assert (g.n_samples, g.labels, g.likelihood) == (37, "mc", "categorical")
    assert list(g) == list(f)
    for k in f:
        assert g[k].dtype == f[k].dtype and torch.equal(g[k], f[k]), k
    _, head = _header(path)
    meta = head["__metadata__"]
    assert meta["format_version"] == "2"
    sums = json.loads(meta["sha256"])
    assert sums == {k: _digest(f[k].cpu()) for k in f}  # the checksum is plain SHA-256


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_flipped_byte_in_the_data_is_detected(tmp_path, where):
    _, path = _saved(tmp_path)
    n, head = _header(path)
    end = max(v["data_offsets"][1] for k, v in head.items() if k != "__metadata__")
    offset = {"first": 0, "middle": end // 2, "last": end - 1}[where]
    _flip(path, [offset])
    with pytest.raises(
        natgrad.CorruptFileError, match=r"is corrupt: tensor .* fails its SHA-256 checksum"
    ):
        DiagonalFisher.load(path)


def test_forty_flipped_bytes_are_detected(tmp_path):
    # The audit's case: 40 flipped bytes loaded silently, one entry became -3.92e3.
    _, path = _saved(tmp_path)
    _flip(path, range(100, 140))
    with pytest.raises(
        natgrad.CorruptFileError, match=r"is corrupt: tensor .* fails its SHA-256 checksum"
    ):
        DiagonalFisher.load(path)


def test_truncated_file_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    _write(path, _read(path)[:-10])
    with pytest.raises(ValueError, match=r"not a readable safetensors file|is corrupt"):
        DiagonalFisher.load(path)


@pytest.mark.parametrize(
    "bad, phrase",
    [
        ([float("nan"), 1.0], "NaN or Inf"),
        ([float("inf"), 1.0], "NaN or Inf"),
        ([-0.5, 1.0], "negative"),
    ],
)
def test_bad_values_in_a_file_with_right_checksums_are_refused(tmp_path, bad, phrase):
    path = tmp_path / "bad.safetensors"
    _craft(path, {"w": torch.tensor(bad), "b": torch.ones(2)})
    with pytest.raises(natgrad.CorruptFileError, match=rf"is corrupt: .*'w'.*{phrase}"):
        DiagonalFisher.load(path)


def test_integer_tensor_in_a_file_is_refused(tmp_path):
    path = tmp_path / "int.safetensors"
    _craft(path, {"w": torch.tensor([1, 2], dtype=torch.int32)})
    with pytest.raises(natgrad.CorruptFileError, match=r"'w'.*int32.*floating-point"):
        DiagonalFisher.load(path)


def test_crafted_good_file_loads_exactly(tmp_path):
    # The reference format written by hand loads to exactly its values (positive control
    # for the crafted-file cases above).
    path = tmp_path / "ok.safetensors"
    w = torch.tensor([0.25, 3.0], dtype=torch.float64)
    _craft(path, {"w": w})
    f = DiagonalFisher.load(path)
    assert f.n_samples == 5 and torch.equal(f["w"], w)


@pytest.mark.parametrize(
    "edit, phrase",
    [
        (lambda m: m.update(n_samples="abc"), r"n_samples 'abc'.*integer >= 0"),
        (lambda m: m.update(n_samples="-4"), r"n_samples '-4'.*integer >= 0"),
        (lambda m: m.pop("n_samples"), r"no 'n_samples' entry"),
        (lambda m: m.update(names="[not json"), r"'names' is not valid JSON"),
        (lambda m: m.update(names='{"a": 1}'), r"'names' must be a list of strings"),
        (lambda m: m.update(names='["0.weight", "ghost"]'), r"'ghost'.*missing"),
        (lambda m: m.pop("names"), r"no 'names' entry"),
        (lambda m: m.pop("sha256"), r"no 'sha256' entry"),
        (lambda m: m.update(sha256='{"0.weight": "00"}'), r"no checksum for '0\.bias'"),
        (lambda m: m.update(shapes='{"0.weight": [5, 16]}'), r"shape"),
        (lambda m: m.update(format_version="x"), r"format_version 'x'"),
    ],
)
def test_corrupt_metadata_is_named_never_keyerror_or_json(tmp_path, edit, phrase):
    _, path = _saved(tmp_path)
    _rewrite_meta(path, edit)
    with pytest.raises(natgrad.CorruptFileError) as info:
        DiagonalFisher.load(path)
    msg = str(info.value)
    assert msg.startswith(f"{str(path)!r} is corrupt: "), msg
    assert "DiagonalFisher.save" in msg  # the fix: write it again
    import re

    assert re.search(phrase, msg), msg


def test_file_from_a_newer_format_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite_meta(path, lambda m: m.update(format_version="99"))
    with pytest.raises(ValueError, match=r"format version 99.*newer natgrad.*upgrade"):
        DiagonalFisher.load(path)


def test_file_without_checksums_from_format_1_is_refused(tmp_path):
    _, path = _saved(tmp_path)

    def old(m):
        for k in ("format_version", "sha256", "dtypes"):
            m.pop(k)

    _rewrite_meta(path, old)
    with pytest.raises(ValueError, match=r"format version 1.*no checksums.*DiagonalFisher.save"):
        DiagonalFisher.load(path)


def test_other_natgrad_kind_is_named(tmp_path):
    _, path = _saved(tmp_path)
    _rewrite_meta(path, lambda m: m.update(format="natgrad.KroneckerFisher"))
    with pytest.raises(ValueError, match=r"holds a natgrad\.KroneckerFisher, not a natgrad\.Diag"):
        DiagonalFisher.load(path)


@pytest.mark.parametrize(
    "value, phrase",
    [(float("nan"), "NaN or Inf"), (float("-inf"), "NaN or Inf"), (-1.0, "negative")],
)
def test_save_refuses_bad_values_and_writes_nothing(tmp_path, value, phrase):
    # construction already refuses such values; a tensor changed in place after it is
    # caught again on save
    with pytest.raises((ValueError, FloatingPointError), match=phrase.split()[0]):
        DiagonalFisher({"w": torch.tensor([1.0, value])}, 3)
    f = DiagonalFisher({"w": torch.tensor([1.0, 2.0])}, 3)
    f["w"][1] = value
    with pytest.raises(ValueError, match=rf"Cannot save.*'w'.*{phrase}"):
        f.save(tmp_path / "f.safetensors")
    assert os.listdir(tmp_path) == []


def test_save_fsyncs_file_and_folder_before_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        import stat

        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def replace(a, b):
        events.append(("replace", os.path.basename(b)))
        return real_replace(a, b)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    _fisher().save(tmp_path / "f.safetensors")
    assert events == [("fsync", "file"), ("replace", "f.safetensors"), ("fsync", "dir")]


@pytest.mark.parametrize("fail_in", ["write", "rename"])
def test_failed_save_leaves_no_temp_file_and_keeps_the_old_file(tmp_path, monkeypatch, fail_in):
    import safetensors.torch as st

    old, path = _saved(tmp_path)
    if fail_in == "write":
        real = st.save_file

        def save_file(tensors, filename, metadata=None):
            real(tensors, filename, metadata=metadata)  # a partial write, then a crash
            with open(filename, "r+b") as fh:
                fh.truncate(20)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(st, "save_file", save_file)
    else:

        def replace(a, b):
            raise KeyboardInterrupt

        monkeypatch.setattr(os, "replace", replace)
    new = DiagonalFisher({k: v * 2 for k, v in old.items()}, 1)
    with pytest.raises((OSError, KeyboardInterrupt)):
        new.save(path)
    assert os.listdir(tmp_path) == ["f.safetensors"]
    monkeypatch.undo()
    again = DiagonalFisher.load(path)
    assert all(torch.equal(again[k], old[k]) for k in old)


# -- checkpoints -------------------------------------------------------------------------------
KW = dict(labels="mc", mc_samples=2, checkpoint_every=1)


def _case():
    torch.manual_seed(0)
    model = mlp((5, 16, 4)).double()
    x = torch.randn(24, 5, dtype=torch.float64)
    y = torch.randint(0, 4, (24,))
    return model, x, y


def _batches(x, y, stop_at=None, n=6):
    for i in range(n):
        if i == stop_at:
            raise KeyboardInterrupt  # the pass is interrupted after `stop_at` batches
        yield x[4 * i : 4 * i + 4], y[4 * i : 4 * i + 4]


def _gen(seed=7):
    return torch.Generator().manual_seed(seed)


def _interrupted(path, x, y, model, stop_at=3):
    with pytest.raises(KeyboardInterrupt):
        estimate_fisher(model, _batches(x, y, stop_at), checkpoint=path, generator=_gen(), **KW)
    state = natgrad.load_checkpoint(path)
    assert state["batches_done"] == stop_at
    return state


def test_resume_on_different_data_is_refused(tmp_path):
    path = str(tmp_path / "c.ckpt")
    model, x, y = _case()
    _interrupted(path, x, y, model)
    x2 = x.clone()
    x2[1, 2] += 1e-3  # one number in the first batch, already done
    with pytest.raises(natgrad.CheckpointMismatchError, match=r"data.*batch 0.*differ"):
        estimate_fisher(model, _batches(x2, y), checkpoint=path, generator=_gen(), **KW)


def test_resume_on_different_labels_is_refused(tmp_path):
    path = str(tmp_path / "c.ckpt")
    model, x, y = _case()
    _interrupted(path, x, y, model)
    y2 = y.clone()
    y2[9] = (y2[9] + 1) % 4  # batch 2
    with pytest.raises(natgrad.CheckpointMismatchError, match=r"batch 2"):
        estimate_fisher(model, _batches(x, y2), checkpoint=path, generator=_gen(), **KW)


def test_resume_on_shorter_data_is_refused(tmp_path):
    path = str(tmp_path / "c.ckpt")
    model, x, y = _case()
    _interrupted(path, x, y, model, stop_at=4)
    with pytest.raises(natgrad.CheckpointMismatchError, match=r"ended after 2 batches.*4"):
        estimate_fisher(model, _batches(x, y, n=2), checkpoint=path, generator=_gen(), **KW)


def test_resume_on_the_same_data_equals_an_uninterrupted_pass(tmp_path):
    path = str(tmp_path / "c.ckpt")
    model, x, y = _case()
    _interrupted(path, x, y, model)
    resumed = estimate_fisher(model, _batches(x, y), checkpoint=path, generator=_gen(), **KW)
    whole = estimate_fisher(model, _batches(x, y), generator=_gen(), **KW)
    assert resumed.n_samples == 24
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_finished_checkpoint_on_new_data_is_refused(tmp_path):
    # Before: the stale Fisher of the old data was returned.
    path = str(tmp_path / "c.ckpt")
    model, x, y = _case()
    estimate_fisher(model, _batches(x, y), checkpoint=path, generator=_gen(), **KW)
    x2 = x + 1.0
    with pytest.raises(natgrad.CheckpointMismatchError, match=r"data"):
        estimate_fisher(model, _batches(x2, y), checkpoint=path, generator=_gen(), **KW)


def test_finished_checkpoint_with_more_batches_is_refused(tmp_path):
    path = str(tmp_path / "c.ckpt")
    model, x, y = _case()
    estimate_fisher(model, _batches(x, y, n=4), checkpoint=path, generator=_gen(), **KW)
    with pytest.raises(natgrad.CheckpointMismatchError, match=r"finished.*4 batches.*more"):
        estimate_fisher(model, _batches(x, y, n=6), checkpoint=path, generator=_gen(), **KW)


def test_mc_resume_with_another_generator_seed_is_refused(tmp_path):
    path = str(tmp_path / "c.ckpt")
    model, x, y = _case()
    _interrupted(path, x, y, model)
    with pytest.raises(natgrad.CheckpointMismatchError, match=r"generator"):
        estimate_fisher(model, _batches(x, y), checkpoint=path, generator=_gen(8), **KW)


# A second process holding the checkpoint's lock as a natgrad pass does (an exclusive
# flock on <checkpoint>.lock, holder stamp inside); plain Python, so it starts in
# milliseconds instead of importing torch.
_HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1] + ".lock", os.O_CREAT | os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"pid {os.getpid()} on here since now".encode())
print("locked", flush=True)
sys.stdin.readline()
os.remove(sys.argv[1] + ".lock")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="fcntl")
def test_lock_held_by_another_process_is_refused(tmp_path):
    path = str(tmp_path / "c.ckpt")
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "locked"
        model, x, y = _case()
        with pytest.raises(natgrad.CheckpointLockedError) as info:
            estimate_fisher(model, (x, y), checkpoint=path)
        msg = str(info.value)
        assert f"{path}.lock" in msg and f"pid {proc.pid}" in msg and "delete" in msg
        assert not os.path.exists(path)  # nothing was written while locked
    finally:
        proc.communicate("\n", timeout=60)
    assert proc.returncode == 0
    # Released: the same pass now runs, and leaves no lock file behind.
    model, x, y = _case()
    got = estimate_fisher(model, (x, y), checkpoint=path)
    ref = estimate_fisher(model, (x, y))
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert sorted(os.listdir(tmp_path)) == ["c.ckpt"]


def test_nested_pass_on_one_path_is_refused_and_errors_release_the_lock(tmp_path):
    path = str(tmp_path / "c.ckpt")
    model, x, y = _case()
    seen = []

    def batches():
        with pytest.raises(natgrad.CheckpointLockedError, match=r"is locked"):
            estimate_fisher(model, (x, y), checkpoint=path)
        seen.append(1)
        yield x[:4], y[:4]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        estimate_fisher(model, batches(), checkpoint=path, **KW)
    assert seen == [1] and not os.path.exists(path + ".lock")
    os.remove(path)
    estimate_fisher(model, _batches(x, y), checkpoint=path, **KW)  # not left locked


def test_lock_file_fallback_without_fcntl_names_a_stale_lock(tmp_path, monkeypatch):
    # Where fcntl is missing (Windows) the lock is an O_EXCL file, which a killed process
    # leaves behind: the error names it and says how to clear it.
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError
    path = str(tmp_path / "c.ckpt")
    with open(path + ".lock", "w") as fh:
        fh.write("pid 4242 on elsewhere since 2026-01-01 00:00:00")
    model, x, y = _case()
    with pytest.raises(natgrad.CheckpointLockedError, match=r"pid 4242.*stale lock.*delete"):
        estimate_fisher(model, (x, y), checkpoint=path)
    os.remove(path + ".lock")
    ref = estimate_fisher(model, (x, y))
    got = estimate_fisher(model, (x, y), checkpoint=path)
    assert all(torch.equal(got[k], ref[k]) for k in ref)
    assert sorted(os.listdir(tmp_path)) == ["c.ckpt"]


@pytest.mark.parametrize(
    "a, b",
    [
        ((torch.zeros(2, 3), torch.ones(2)), (torch.zeros(3, 2), torch.ones(2))),  # shape
        ((torch.zeros(4),), (torch.zeros(4, dtype=torch.int32),)),  # dtype, same bytes
        ({"ids": torch.ones(2), "mask": torch.zeros(2)}, {"ids": torch.ones(2)}),  # keys
        ([torch.ones(2), 3], [torch.ones(2), 4]),  # plain values
    ],
)
def test_batch_digest_tells_batches_apart(a, b):
    from natgrad.engine.checkpoint import batch_digest

    assert batch_digest(a) != batch_digest(b)
    assert batch_digest(a) == batch_digest(a)


def _tamper(path, edit, *, reseal=True):
    """Edit a checkpoint's state; with ``reseal``, its checksum is recomputed (a consistent
    edit, so that the checks behind the checksum are reached)."""
    from natgrad.engine.checkpoint import state_digest

    state = torch.load(path, weights_only=True)
    edit(state)
    if reseal:
        state["digest"] = state_digest(state)
    torch.save(state, path)


@pytest.mark.parametrize(
    "edit, phrase",
    [
        (lambda s: s["sums"]["0.weight"].__setitem__((0, 0), float("nan")), r"NaN or Inf"),
        (lambda s: s["sums"]["0.bias"].__setitem__(3, -1.0), r"negative"),
        (lambda s: s["sums"].__setitem__("0.weight", torch.zeros(5, 16)), r"shape \(5, 16\)"),
        (lambda s: s["sums"].pop("2.bias"), r"'2\.bias' is missing"),
        (lambda s: s.pop("sums"), r"no 'sums'"),
        (lambda s: s.__setitem__("n_samples", -3), r"n_samples"),
        (lambda s: s.__setitem__("batches_done", "2"), r"batches_done"),
    ],
)
def test_restored_sums_are_checked(tmp_path, edit, phrase):
    path = str(tmp_path / "c.ckpt")
    model, x, y = _case()
    _interrupted(path, x, y, model)
    _tamper(path, edit)
    with pytest.raises(natgrad.CorruptFileError, match=rf"is corrupt: .*{phrase}"):
        estimate_fisher(model, _batches(x, y), checkpoint=path, generator=_gen(), **KW)


@pytest.mark.parametrize("edit", [
    lambda s: s["sums"]["0.weight"].mul_(2.0),
    lambda s: s.__setitem__("n_samples", s["n_samples"] + 4),
    lambda s: s.__setitem__("batches_done", s["batches_done"] - 1),
])
def test_a_checkpoint_edited_since_it_was_written_fails_its_checksum(tmp_path, edit):
    """Sums doubled, n_samples or batches_done changed: accepted, giving a wrong Fisher
    (only structure, finiteness and sign were checked; found by review)."""
    path = str(tmp_path / "c.ckpt")
    model, x, y = _case()
    _interrupted(path, x, y, model)
    _tamper(path, edit, reseal=False)
    with pytest.raises(natgrad.CorruptFileError, match="do not match their checksum"):
        estimate_fisher(model, _batches(x, y), checkpoint=path, generator=_gen(), **KW)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_foreign_pickle_is_refused_without_advising_weights_only_false(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"format": 2, "x": _Evil()}, path)
    model, x, y = _case()
    with pytest.raises(ValueError, match=r"not a readable natgrad Fisher checkpoint") as info:
        estimate_fisher(model, (x, y), checkpoint=str(path))
    assert "weights_only" not in str(info.value)


def test_no_source_advises_weights_only_false():
    hits = []
    for folder, _, files in os.walk(os.path.join(ROOT, "natgrad")):
        for name in files:
            if name.endswith(".py") and b"weights_only=False" in _read(os.path.join(folder, name)):
                hits.append(name)
    assert hits == []


# -- the command: --out is never overwritten without --force; bad Fisher files -----------------
def _cli(capsys, *args):
    from natgrad.cli.main import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


def test_report_refuses_to_overwrite_and_lists_what_exists(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    _, path = _saved(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("mine")
    (out / "report.json").write_text("{}")
    code, err = _cli(capsys, "report", str(path), "--out", str(out))
    assert code == 1
    assert "report.json, report.md" in err and "--force" in err
    assert (out / "report.md").read_text() == "mine"
    code, err = _cli(capsys, "report", str(path), "--out", str(out), "--force")
    assert code == 0, err
    assert (out / "report.md").read_text().startswith("# natgrad Fisher report")


def test_demo_refuses_to_overwrite_before_training(tmp_path, capsys, monkeypatch):
    import natgrad.cli.demo as demo

    calls = []
    monkeypatch.setattr(demo, "run_demo", lambda *a, **k: calls.append(a) or 1 / 0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "fisher_task_A.safetensors").write_text("mine")
    (out / "unrelated.txt").write_text("kept")
    code, err = _cli(capsys, "demo", "--quick", "--out", str(out))
    assert code == 1 and calls == []
    assert "fisher_task_A.safetensors" in err and "unrelated" not in err and "--force" in err
    with pytest.raises(ZeroDivisionError):  # --force gets past the check, into the demo
        _cli(capsys, "demo", "--quick", "--out", str(out), "--force")
    assert len(calls) == 1


@pytest.mark.parametrize("bad, phrase", [(float("nan"), "NaN or Inf"), (-2.0, "negative")])
def test_report_of_a_bad_fisher_exits_non_zero(tmp_path, capsys, bad, phrase):
    path = tmp_path / "bad.safetensors"
    _craft(path, {"w": torch.tensor([1.0, bad])})
    code, err = _cli(capsys, "report", str(path), "--out", str(tmp_path / "out"))
    assert code == 1
    assert err.startswith("natgrad: error: ") and "is corrupt" in err and phrase in err
    assert not (tmp_path / "out" / "report.md").exists()


@pytest.mark.parametrize("zipped", [True, False], ids=["zip", "legacy-pickle"])
def test_torch_save_file_is_named_with_the_writer_to_use(tmp_path, capsys, zipped):
    """A ``torch.save`` file is named as such (not "header too large"), with the writer."""
    path = tmp_path / "fisher.pt"
    torch.save({"w": torch.ones(3)}, path, _use_new_zipfile_serialization=zipped)
    phrase = r"not a natgrad Fisher file: it looks like a torch\.save file"
    with pytest.raises(ValueError, match=phrase + r".*DiagonalFisher\.save"):
        DiagonalFisher.load(path)
    code, err = _cli(capsys, "report", str(path), "--out", str(tmp_path / "out"))
    assert code == 1 and err.startswith("natgrad: error: ")
    assert "not a natgrad Fisher file" in err and "DiagonalFisher.save" in err
    assert "header too large" not in err
    with pytest.raises(ValueError, match=r"not a natgrad curvature file: it looks like a torch"):
        natgrad.Curvature.load(path)


def test_report_refuses_one_file_given_twice(tmp_path, capsys):
    """The same file twice (one path twice, or two paths to it) is refused by name; it
    read as one section, silently."""
    _, path = _saved(tmp_path)
    other = tmp_path / "sub" / ".." / path.name  # another spelling of the same file
    (tmp_path / "sub").mkdir()
    for args, phrase in [
        ((str(path), str(path)), f"{str(path)!r} is given twice"),
        ((str(path), str(other)), f"{str(path)!r} and {str(other)!r} are the same file"),
    ]:
        code, err = _cli(capsys, "report", *args, "--out", str(tmp_path / "out"))
        assert code == 1 and err.startswith("natgrad: error: ")
        assert phrase in err and "pass each file once" in err
        assert not (tmp_path / "out" / "report.md").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_round_trip_and_resume(tmp_path):
    f = _fisher().to("cuda")
    f.save(tmp_path / "f.safetensors")
    g = DiagonalFisher.load(tmp_path / "f.safetensors", device="cuda")
    assert all(g[k].is_cuda and torch.equal(g[k], f[k]) for k in f)
    path = str(tmp_path / "c.ckpt")
    model, x, y = _case()
    model, x, y = model.cuda(), x.cuda(), y.cuda()
    with pytest.raises(KeyboardInterrupt):
        estimate_fisher(model, _batches(x, y, 3), checkpoint=path, checkpoint_every=1)
    resumed = estimate_fisher(model, _batches(x, y), checkpoint=path, checkpoint_every=1)
    whole = estimate_fisher(model, _batches(x, y))
    for k in whole:  # CUDA kernels may reduce in another order from run to run
        torch.testing.assert_close(resumed[k], whole[k], rtol=1e-6, atol=1e-12)


def test_truncated_fisher_file_whose_header_length_looks_like_a_pickle(tmp_path):
    """A natgrad file with a 640-byte header (length bytes 80 02 ...) cut short: named as a
    damaged safetensors file, not as "a torch.save file (a pickle)" (found by review)."""
    import struct

    header = b'{"__metadata__":{"format":"natgrad"}' + b" " * (640 - 37) + b"}"
    assert len(header) == 640 and struct.pack("<Q", 640)[:2] == b"\x80\x02"
    path = tmp_path / "trunc.safetensors"
    path.write_bytes(struct.pack("<Q", 640) + header[:100])  # cut inside the header
    with pytest.raises(ValueError) as err:
        DiagonalFisher.load(path)
    assert "torch.save" not in str(err.value) and "not a readable safetensors file" in str(err.value)


@pytest.mark.parametrize("bad", [None, "abc", -5, 3.7])
def test_load_state_dict_with_a_bad_n_samples_replaces_nothing(bad):
    """A bad n_samples raised a bare KeyError / int() error after the values had already
    been replaced (or was accepted: -5, 3.7 -> 3), against "nothing is replaced when it
    raises" (found by review)."""
    f = DiagonalFisher({"w": torch.ones(3, dtype=torch.float64)}, 4)
    state = f.state_dict()
    state["values"] = {"w": torch.full((3,), 2.0, dtype=torch.float64)}
    if bad is None:
        del state["n_samples"]
    else:
        state["n_samples"] = bad
    with pytest.raises(ValueError, match=r"n_samples is .*not an integer >= 0"):
        f.load_state_dict(state)
    assert torch.equal(f["w"], torch.ones(3, dtype=torch.float64)) and f.n_samples == 4


def test_saved_files_get_the_mode_of_a_plain_open(tmp_path):
    """atomic_path's temporary file is 0600 (mkstemp); a saved Fisher kept that mode, so a
    file another user must read was private (found by review). A new file takes 0666 less
    the umask; a replaced file keeps its own mode."""
    import os

    f = DiagonalFisher({"w": torch.ones(3)}, 4)
    old = os.umask(0o022)
    try:
        f.save(tmp_path / "new.safetensors")
        assert os.stat(tmp_path / "new.safetensors").st_mode & 0o777 == 0o644
        existing = tmp_path / "kept.safetensors"
        f.save(existing)
        os.chmod(existing, 0o640)
        f.save(existing)
        assert os.stat(existing).st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_report_of_an_all_zero_fisher_shows_no_nan_share(tmp_path, capsys):
    """An all-zero Fisher's layer shares read "nan%" (0/0; found by review)."""
    zero = tmp_path / "zero.safetensors"
    DiagonalFisher({"w": torch.zeros(3), "b": torch.zeros(2)}, 4).save(zero)
    code, err = _cli(capsys, "report", str(zero), "--out", str(tmp_path / "out"))
    assert code == 0, err
    text = (tmp_path / "out" / "report.md").read_text()
    assert "nan" not in text and "| w | 0 | — |" in text and "no share of the trace" in text


@pytest.mark.parametrize("key, value", [("n_samples", "64"), ("labels", "bogus"),
                                        ("likelihood", "categoricalx")])
def test_metadata_edited_by_hand_fails_its_checksum(tmp_path, key, value):
    """n_samples, labels or the likelihood changed in a saved file's header were accepted
    (the checksums covered the tensors only; n_samples feeds EWC's suggest_lambda and
    merge weights; found by review)."""
    _, path = _saved(tmp_path)
    _rewrite_meta(path, lambda m: m.update({key: value}), reseal=False)
    with pytest.raises(natgrad.CorruptFileError, match="does not match its checksum"):
        DiagonalFisher.load(path)


def test_save_does_not_replace_a_file_natgrad_did_not_write(tmp_path):
    """DiagonalFisher.save replaced any file at its path (a user's notes; found by review);
    it replaces natgrad's own files only."""
    f = DiagonalFisher({"w": torch.ones(3)}, 4)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(FileExistsError, match="not a file natgrad wrote"):
        f.save(notes)
    assert notes.read_text() == "my notes"
    path = tmp_path / "f.safetensors"
    f.save(path)
    DiagonalFisher({"w": torch.zeros(3)}, 2).save(path)  # natgrad's own: replaced
    assert DiagonalFisher.load(path).n_samples == 2


def test_save_overwrite_replaces_a_foreign_file(tmp_path):
    """``overwrite=True`` (what `natgrad demo --force` passes) replaces a file natgrad did
    not write (the demo's --force refused a foreign file at its Fisher's name); every
    curvature kind's save takes it."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    DiagonalFisher({"w": torch.full((3,), 2.0)}, 4).save(notes, overwrite=True)
    assert torch.equal(DiagonalFisher.load(notes)["w"], torch.full((3,), 2.0))
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    curv = natgrad.estimate_curvature(model, (x, y), kind="kfac")
    other = tmp_path / "other.bin"
    other.write_bytes(b"\x00" * 16)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        curv.save(other)
    assert other.read_bytes() == b"\x00" * 16
    curv.save(other, overwrite=True)
    back = type(curv).load(other, model)
    assert all(torch.equal(a, b) for a, b in zip(back.diagonal().values(),
                                                 curv.diagonal().values(), strict=True))
