"""Resumable Fisher passes: locked, verified, atomic checkpoints of partial sums.

A pass over ``B`` batches accumulates ``S = Σ_n Σ_j w_j g_nj²`` and ``N``. Every
``checkpoint_every`` batches the state ``(S, N, batches done, MC generator state, data
digests)`` is written with :func:`natgrad.engine.files.atomic_path` (temporary file,
``fsync``, ``os.replace``), so a killed process leaves either the previous or the new
checkpoint, never a torn one.

What makes a rerun a resume of the same pass (the fingerprint, :func:`run_fingerprint`):
the options (label source, likelihood, MC samples, engine, max_batches), the parameter
names, shapes and a checksum of their values, the initial state of the MC generator
(for ``labels="mc"``), and the rank and world size under ``torch.distributed``. The data
are checked batch by batch: each batch's SHA-256 (:func:`batch_digest`) is stored, and a
rerun hashes the batches it skips and compares them, so resuming on other data, or
rerunning a finished pass on new or longer data, is refused
(:class:`CheckpointMismatchError`) instead of mixing two data sets or returning a stale
Fisher. Restored sums are checked for names, shapes, finiteness and sign
(:class:`natgrad.engine.files.CorruptFileError`).

One process at a time: :func:`checkpoint_lock` holds an exclusive lock on
``<checkpoint>.lock`` for the whole pass (``fcntl.flock``, released by the kernel if the
process dies; an ``O_EXCL`` lock file where ``fcntl`` is missing), so two processes on
one path cannot interleave their sums (:class:`CheckpointLockedError`).

Checkpoints are read with ``torch.load(weights_only=True)``: they hold tensors and plain
values only, and natgrad never unpickles anything else.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch

from natgrad.engine.files import CorruptFileError, atomic_path, find_invalid, tensor_sha256

__all__ = [
    "CheckpointLockedError",
    "CheckpointMismatchError",
    "batch_digest",
    "checkpoint_lock",
    "run_fingerprint",
    "save_checkpoint",
    "load_checkpoint",
    "state_digest",
    "tensor_digest",
    "check_same_run",
    "check_state",
    "DataCheck",
]

_FORMAT = 3  # 3: a SHA-256 of the whole state (2: without; 1: without data digests)
_FIX = "Delete it (or pass another checkpoint path) to start the pass over."


class CheckpointMismatchError(ValueError):
    """A checkpoint that belongs to another pass: other options, model, data, generator,
    rank or world size. Resuming would mix two passes, so natgrad refuses."""


class CheckpointLockedError(RuntimeError):
    """Another pass (another process, or an enclosing call) holds the checkpoint's lock."""


# -- fingerprint -----------------------------------------------------------------------------
def _generator_digest(generator: torch.Generator | None) -> str | None:
    if generator is None:
        return None
    return hashlib.sha256(generator.get_state().numpy().data).hexdigest()


def tensor_digest(t: torch.Tensor) -> str:
    """A tensor's dtype and shape with the SHA-256 of its bytes
    (:func:`natgrad.engine.files.tensor_sha256`): any change of value, dtype or shape
    changes it."""
    return f"{t.dtype}{tuple(t.shape)}:{tensor_sha256(t)}"


def run_fingerprint(
    params: Mapping[str, torch.Tensor],
    *,
    buffers: Mapping[str, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    rank: int = 0,
    world_size: int = 1,
    **options: Any,
) -> dict[str, Any]:
    """What identifies a Fisher pass: options, parameter names/shapes, the parameters'
    and buffers' exact values and dtypes, the generator's initial state, rank and world
    size.

    Values are fingerprinted by :func:`tensor_digest` (SHA-256 of dtype, shape and
    bytes: a model trained, cast or with its BatchNorm statistics changed since the
    checkpoint is told apart, however small the change). ``generator`` (pass it when the
    label source draws, ``labels="mc"``) is fingerprinted by the SHA-256 of its state
    before the pass.

    Example:
        >>> import torch
        >>> fp = run_fingerprint({"w": torch.ones(2)}, labels="mc")
        >>> fp["shapes"], fp["options"], fp["rank"], fp["world_size"]
        ({'w': (2,)}, {'labels': 'mc'}, 0, 1)
    """
    return {
        "options": {k: options[k] for k in sorted(options)},
        "shapes": {k: tuple(p.shape) for k, p in params.items()},
        "checksum": {k: tensor_digest(p) for k, p in params.items()},
        "buffers": {k: tensor_digest(b) for k, b in (buffers or {}).items()},
        "generator": _generator_digest(generator),
        "rank": int(rank),
        "world_size": int(world_size),
    }


def check_same_run(path: str, saved: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Raise :class:`CheckpointMismatchError` naming what differs between a checkpoint's
    fingerprint and the current run's."""
    old = saved["fingerprint"]
    diffs: list[str] = []
    for key in ("options", "shapes", "checksum", "buffers"):
        if old.get(key) != fingerprint[key]:
            a, b = old.get(key) or {}, fingerprint[key]
            names = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            label = {"checksum": "parameter values or dtypes",
                     "buffers": "buffers (e.g. BatchNorm statistics)"}.get(key, key)
            diffs.append(f"{label} ({', '.join(map(str, names[:6]))})")
    if old.get("generator") != fingerprint["generator"]:
        diffs.append("the MC generator's seed/state")
    for key, label in (("rank", "rank"), ("world_size", "world size")):
        if old.get(key) != fingerprint[key]:
            diffs.append(f"{label} ({old.get(key)} then, {fingerprint[key]} now)")
    if diffs:
        raise CheckpointMismatchError(
            f"The checkpoint {path!r} was written by a different Fisher pass: "
            + "; ".join(diffs)
            + " differ. Rerun with the same model, arguments and generator (and, under "
            "torch.distributed, the same rank and world size) to resume, or delete the "
            "file (or pass another checkpoint path) to start over."
        )


# -- data digests ----------------------------------------------------------------------------
def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        h.update(f"T{str(t.dtype)}{tuple(t.shape)}".encode())
        t = t.contiguous().cpu().reshape(-1)
        h.update(t.view(torch.uint8).numpy().data)
    elif isinstance(obj, Mapping):
        h.update(f"M{len(obj)}".encode())
        for k in obj:
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, complex, str, bytes)):
        h.update(f"V{obj!r}".encode())
    elif hasattr(obj, "tobytes") and hasattr(obj, "dtype"):  # numpy arrays and scalars
        h.update(f"A{obj.dtype}{getattr(obj, 'shape', ())}".encode())
        h.update(obj.tobytes())
    else:  # other objects: their type only (their repr may hold a memory address)
        h.update(f"O{type(obj).__qualname__}".encode())


def batch_digest(batch: Any) -> bytes:
    """SHA-256 (32 bytes) of a batch: every tensor's dtype, shape and bytes, and the
    structure (tuples, lists, dict keys) around them.

    Example:
        >>> import torch
        >>> x = torch.arange(3.0)
        >>> batch_digest((x, x)) == batch_digest((x.clone(), x.clone()))
        True
        >>> batch_digest((x, x)) == batch_digest((x, x + 1))
        False
    """
    h = hashlib.sha256()
    _feed(h, batch)
    return h.digest()


class DataCheck:
    """Hash the batches of a (re)run as they are read; compare the ones a checkpoint
    already covers, and yield only the rest.

    Args:
        path: the checkpoint (for messages).
        digests: ``(done, 32)`` uint8 tensor of the checkpointed batches' digests.
        finished: the checkpoint holds a complete pass (no batch may follow).
    """

    def __init__(self, path: str, digests: torch.Tensor | None = None, finished: bool = False):
        self.path = path
        self.old = digests if digests is not None else torch.zeros(0, 32, dtype=torch.uint8)
        self.finished = finished
        self.digests: list[bytes] = [bytes(r.tolist()) for r in self.old]

    def _mismatch(self, what: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(
            f"The checkpoint {self.path!r} was written for other data: {what}. Pass the same "
            "data in the same order to resume, or delete the file (or pass another "
            "checkpoint path) to start over."
        )

    def batches(self, batches: Iterable[Any]) -> Iterator[Any]:
        """Yield the batches after the checkpointed ones, checking those against it."""
        done = len(self.old)
        i = -1
        for i, batch in enumerate(batches):
            d = batch_digest(batch)
            if i < done:
                if d != self.digests[i]:
                    raise self._mismatch(
                        f"batch {i} (of the {done} done) and the batch read now differ"
                    )
                continue
            if self.finished:
                raise self._mismatch(
                    f"it holds a finished pass over {done} batches, but the data has more"
                )
            self.digests.append(d)
            yield batch
        if i + 1 < done:
            raise self._mismatch(f"the data ended after {i + 1} batches, but {done} were done")

    def state(self, done: int) -> torch.Tensor:
        """The digests of the first ``done`` batches, as a ``(done, 32)`` uint8 tensor."""
        rows = self.digests[:done]
        if not rows:
            return torch.zeros(0, 32, dtype=torch.uint8)
        return torch.tensor([list(r) for r in rows], dtype=torch.uint8)


# -- files -------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically and durably (see
    :func:`natgrad.engine.files.atomic_path`).

    Example:
        >>> import os, tempfile, torch
        >>> p = os.path.join(tempfile.mkdtemp(), "f.pt")
        >>> save_checkpoint(p, {"n": 3})
        >>> load_checkpoint(p)["n"]
        3
    """
    body = {"format": _FORMAT, **state}
    body["digest"] = state_digest(body)
    with atomic_path(path, prefix=".natgrad-ckpt-") as tmp:
        torch.save(body, tmp)


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of every entry of a saved state but the digest itself (sums, counts,
    fingerprint, data digests): a checkpoint edited or damaged since it was written
    fails it."""
    h = hashlib.sha256()
    _feed(h, {k: state[k] for k in sorted(state) if k != "digest"})
    return h.hexdigest()


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The state saved at ``path``, or None when there is no file.

    The state of a Fisher pass holds ``fingerprint``, ``sums`` (``{name: tensor}``),
    ``n_samples``, ``batches_done``, ``generator_state``, ``data`` (the batches'
    digests) and ``finished``: enough to see how far a pass got.

    Raises:
        ValueError: the file is not a natgrad Fisher checkpoint of this format (it is
            never unpickled beyond tensors and plain values).

    Example:
        >>> import os, tempfile
        >>> load_checkpoint(os.path.join(tempfile.mkdtemp(), "missing.pt")) is None
        True
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unreadable or foreign file
        first = (str(err).strip().splitlines() or [""])[0]
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            # torch's own message advises unsafe loading; natgrad never does that
            first = "it holds objects other than tensors and plain values"
        raise ValueError(
            f"{path!r} is not a readable natgrad Fisher checkpoint ({type(err).__name__}: "
            f"{first[:200]}). Pass another checkpoint path (a file natgrad may create); "
            "it is left as it is."
        ) from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        old = isinstance(state, dict) and state.get("format") in (1, 2)
        raise ValueError(
            f"{path!r} is not a natgrad Fisher checkpoint (format {_FORMAT})"
            + ("; it was written by an older natgrad, without checksums" if old else "")
            + ". Pass another checkpoint path (a file natgrad may create); "
            + ("delete this one to start over." if old else "it is left as it is.")
        )
    if state.get("digest") != state_digest(state):
        raise CorruptFileError(
            path, "its contents (sums, counts, fingerprint) do not match their checksum: "
            "it was edited or damaged since it was written", _FIX)
    return state


def check_state(
    path: str,
    state: Mapping[str, Any],
    like: Mapping[str, torch.Tensor],
    fingerprint: dict[str, Any],
) -> None:
    """Check a loaded pass state before resuming from it.

    Raises:
        CorruptFileError: an entry is missing or malformed, or a restored sum has the
            wrong shape, a non-finite or a negative entry.
        CheckpointMismatchError: the state belongs to another pass (see
            :func:`check_same_run`).
    """

    def bad(reason: str) -> CorruptFileError:
        return CorruptFileError(path, reason, _FIX)

    for key in ("fingerprint", "sums", "n_samples", "batches_done", "generator_state", "data"):
        if key not in state:
            raise bad(f"it has no {key!r} entry")
    if not isinstance(state["fingerprint"], dict):
        raise bad("its fingerprint is not a dict")
    check_same_run(path, dict(state), fingerprint)
    for key in ("n_samples", "batches_done"):
        v = state[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise bad(f"{key} is {v!r}, not an integer >= 0")
    sums = state["sums"]
    if not isinstance(sums, Mapping) or not all(isinstance(v, torch.Tensor) for v in sums.values()):
        raise bad("'sums' is not a {name: tensor} mapping")
    for k, ref in like.items():
        if k not in sums:
            raise bad(f"the sum of {k!r} is missing")
        got = sums[k]
        if tuple(got.shape) != tuple(ref.shape) or not got.is_floating_point():
            raise bad(
                f"the sum of {k!r} has shape {tuple(got.shape)} and dtype {got.dtype}, "
                f"expected {tuple(ref.shape)} floating-point"
            )
    extra = [k for k in sums if k not in like]
    if extra:
        raise bad(f"it has sums for parameters this pass does not cover: {extra[:5]}")
    problem = find_invalid(sums, nonnegative=True)
    if problem:
        raise bad(problem.replace("a Fisher is", "sums of squares are"))
    data = state["data"]
    if (
        not isinstance(data, torch.Tensor)
        or data.dtype != torch.uint8
        or tuple(data.shape) != (state["batches_done"], 32)
    ):
        raise bad("its data digests do not match batches_done")
    if not isinstance(state["generator_state"], torch.Tensor):
        raise bad("generator_state is not a tensor")
    if not isinstance(state.get("finished", False), bool):
        raise bad("'finished' is not a bool")


# -- lock ----------------------------------------------------------------------------------
def _holder(lock: str) -> str:
    try:
        with open(lock) as fh:
            text = fh.read().strip()
    except OSError:
        return "another process"
    return text or "another process"


def _locked(lock: str, path: str) -> CheckpointLockedError:
    return CheckpointLockedError(
        f"The checkpoint {path!r} is locked by {_holder(lock)} (lock file {lock!r}): another "
        "Fisher pass is using it, and two passes on one checkpoint would mix their sums. "
        "Wait for it to finish, or pass another checkpoint path (under torch.distributed, "
        f"one per rank). If no such process runs (a stale lock), delete {lock!r}."
    )


@contextlib.contextmanager
def checkpoint_lock(path: str | os.PathLike[str]) -> Iterator[str]:
    """Hold an exclusive lock on ``<path>.lock`` for the block; yields the lock path.

    ``fcntl.flock`` where available (the kernel releases it when the process dies, so a
    killed pass never leaves a stale lock), else an ``O_EXCL`` lock file. The lock file
    holds ``pid <pid> on <host> since <time>`` and is removed on release.

    Raises:
        CheckpointLockedError: someone else holds the lock; the message names the lock
            file, its holder and how to clear a stale one.
    """
    path = os.fspath(path)
    lock = path + ".lock"
    folder = os.path.dirname(os.path.abspath(lock))
    os.makedirs(folder, exist_ok=True)
    stamp = (
        f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
    )
    fcntl: Any
    try:
        import fcntl
    except ImportError:  # Windows: an exclusive-create lock file
        fcntl = None
    if fcntl is None:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            raise _locked(lock, path) from None
        try:
            os.write(fd, stamp.encode())
            os.close(fd)
            yield lock
        finally:
            with contextlib.suppress(OSError):
                os.remove(lock)
        return
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise _locked(lock, path) from None
        # The holder before us may have removed the file after we opened it: then we
        # locked a deleted file, and must lock the one now at `lock` instead.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, stamp.encode())
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.remove(lock)
        os.close(fd)
