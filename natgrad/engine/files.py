"""natgrad's files: one atomic writer and one verified tensor-file format.

Everything natgrad writes to disk goes through here, so that every file kind gets the
same guarantees:

* **Atomic, durable writes** (:func:`atomic_path`): the content is written to a
  temporary file in the target's folder, flushed to disk (``fsync``), moved into place
  with ``os.replace`` (atomic on POSIX and Windows), and the folder is synced so the
  rename itself survives a power cut. A failed or interrupted write removes the
  temporary file and leaves the previous file untouched.
* **Verified tensor files** (:func:`save_tensors` / :func:`load_tensors`): safetensors
  with metadata ``format`` (the kind, e.g. ``"natgrad.DiagonalFisher"``),
  ``format_version`` (:data:`FORMAT_VERSION`), ``natgrad_version``, ``names`` (order),
  ``shapes``, ``dtypes`` and ``sha256``: per tensor, the SHA-256 of its raw
  little-endian bytes as stored in the file. Loading checks all of them, accepts only
  floating-point tensors, and reports any mismatch as :class:`CorruptFileError`
  ``"'<path>' is corrupt: <what>. <fix>"``, never as a KeyError or JSON error.

A curvature kind adds its own metadata (e.g. ``n_samples``) and reads it back with
:func:`meta_int` / :func:`meta_json`, and checks its values with :func:`find_invalid`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from natgrad._version import __version__

__all__ = [
    "FORMAT_VERSION",
    "CorruptFileError",
    "atomic_path",
    "save_tensors",
    "load_tensors",
    "read_format",
    "meta_int",
    "meta_json",
    "find_invalid",
    "tensor_sha256",
]

#: Version of the verified tensor-file layout. 1: no checksums (natgrad < 0.3 files);
#: 2: ``format_version``, ``dtypes`` and ``sha256`` metadata.
FORMAT_VERSION = 2

_RESERVED = ("format", "format_version", "natgrad_version", "names", "shapes", "dtypes", "sha256",
             "meta_sha256")


def _meta_digest(meta: Mapping[str, str]) -> str:
    """SHA-256 of every metadata entry but ``meta_sha256`` itself (``n_samples``, labels
    and the like are covered, as the tensors are by their own checksums)."""
    body = json.dumps({k: meta[k] for k in sorted(meta) if k != "meta_sha256"})
    return hashlib.sha256(body.encode()).hexdigest()


class CorruptFileError(ValueError):
    """A natgrad file (Fisher file or checkpoint) whose contents fail verification.

    The message reads ``"'<path>' is corrupt: <what>. <fix>"``; ``path`` and ``reason``
    are attributes.
    """

    def __init__(self, path: str, reason: str, fix: str):
        self.path, self.reason = path, reason
        super().__init__(f"{path!r} is corrupt: {reason}. {fix}")


# -- atomic writes -------------------------------------------------------------------------
def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: str) -> None:
    """Make a rename in ``folder`` durable (POSIX; folders cannot be opened on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], prefix: str = ".natgrad-") -> Iterator[str]:
    """A temporary path to write; on success it is synced and renamed to ``path``.

    The temporary file lies in ``path``'s folder (created if missing), so the rename is
    atomic: readers see the old file or the complete new one, never a torn one. On any
    exception (or KeyboardInterrupt) inside the block, the temporary file is removed and
    ``path`` keeps its previous content.

    Example:
        >>> import os, tempfile
        >>> target = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> with atomic_path(target) as tmp:
        ...     _ = open(tmp, "w").write("hello")
        >>> open(target).read(), os.listdir(os.path.dirname(target))
        ('hello', ['a.txt'])
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        # mkstemp makes the file private (0600): give it the mode a plain open() would
        # (0666 less the umask), or the old file's own mode when it replaces one
        try:
            mode = os.stat(path).st_mode & 0o7777
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp, mode)
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    _fsync_dir(folder)


# -- verified tensor files --------------------------------------------------------------------
def tensor_sha256(t: torch.Tensor) -> str:
    """SHA-256 (hex) of a tensor's raw bytes in memory order (little-endian on every
    platform torch supports), as safetensors stores them.

    Example:
        >>> tensor_sha256(torch.zeros(0)) == __import__("hashlib").sha256(b"").hexdigest()
        True
    """
    t = t.detach().contiguous().cpu().reshape(-1)
    return hashlib.sha256(t.view(torch.uint8).numpy().data).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def find_invalid(tensors: Mapping[str, torch.Tensor], *, nonnegative: bool) -> str | None:
    """The first problem among ``tensors``' values, or None: a non-finite entry, or (with
    ``nonnegative``) a negative one. Used for Fisher values and checkpointed sums.

    Example:
        >>> find_invalid({"w": torch.tensor([1.0, -2.0])}, nonnegative=True)
        "tensor 'w' has negative entries (1 of 2, smallest -2), but a Fisher is >= 0"
    """
    for k, v in tensors.items():
        bad = ~torch.isfinite(v)
        if bool(bad.any()):
            return f"tensor {k!r} holds NaN or Inf ({int(bad.sum())} of {v.numel()} entries)"
        if nonnegative and v.numel() and bool((v < 0).any()):
            neg = v < 0
            return (
                f"tensor {k!r} has negative entries ({int(neg.sum())} of {v.numel()}, smallest "
                f"{float(v.min()):.4g}), but a Fisher is >= 0"
            )
    return None


def save_tensors(
    path: str | os.PathLike[str],
    tensors: Mapping[str, torch.Tensor],
    kind: str,
    metadata: Mapping[str, str] | None = None,
    *,
    overwrite: bool = False,
) -> None:
    """Write ``tensors`` to a verified safetensors file, atomically (see :func:`atomic_path`).

    Args:
        path: target file.
        tensors: ``{name: floating-point tensor}``; saved from CPU copies, in this order.
        kind: the file kind stored as ``format`` (e.g. ``"natgrad.DiagonalFisher"``).
        metadata: the kind's own ``{key: str}`` entries (not the reserved keys).
        overwrite: replace whatever file is at ``path`` (the caller's ``--force``).

    A file already at ``path`` is replaced only when natgrad wrote it (a safetensors file
    with natgrad's ``format`` entry) or ``overwrite`` is set; any other file may be the
    user's own and is left alone (``FileExistsError``).

    Raises:
        TypeError: a tensor is not floating-point.
        ValueError: ``metadata`` uses a reserved key.
        FileExistsError: ``path`` exists, is not a natgrad file, and ``overwrite`` is not set.
    """
    from safetensors.torch import save_file

    if os.path.lexists(path) and not overwrite:
        try:
            theirs = read_format(path)
        except (ValueError, OSError):
            theirs = None
        if theirs is None or not theirs.startswith("natgrad."):
            raise FileExistsError(
                f"{os.fspath(path)!r} exists and is not a file natgrad wrote, so it is not "
                "replaced (it may be yours): pass another path, remove it first, or pass "
                "overwrite=True."
            )

    for k, v in tensors.items():
        if not v.is_floating_point():
            raise TypeError(
                f"Cannot save tensor {k!r} of dtype {_dtype_name(v.dtype)}: a {kind} file holds "
                "floating-point tensors only; convert it with .float()."
            )
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise ValueError(f"metadata keys {clash} are reserved by the natgrad file format.")
    cpu = {}
    for k, v in tensors.items():
        t = v.detach().contiguous().cpu()
        if t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()  # a view into a larger buffer: safetensors needs its own storage
        cpu[k] = t
    meta.update(
        format=kind,
        format_version=str(FORMAT_VERSION),
        natgrad_version=__version__,
        names=json.dumps(list(cpu)),
        shapes=json.dumps({k: list(t.shape) for k, t in cpu.items()}),
        dtypes=json.dumps({k: _dtype_name(t.dtype) for k, t in cpu.items()}),
        sha256=json.dumps({k: tensor_sha256(t) for k, t in cpu.items()}),
    )
    meta["meta_sha256"] = _meta_digest(meta)
    with atomic_path(path, prefix=".natgrad-file-") as tmp:
        save_file(cpu, tmp, metadata=meta)


def meta_json(path: str, meta: Mapping[str, str], key: str, fix: str) -> Any:
    """``json.loads(meta[key])``; a missing key or bad JSON is a :class:`CorruptFileError`."""
    if key not in meta:
        raise CorruptFileError(path, f"its metadata has no {key!r} entry", fix)
    try:
        return json.loads(meta[key])
    except ValueError:
        raise CorruptFileError(
            path, f"metadata {key!r} is not valid JSON ({meta[key][:60]!r})", fix
        ) from None


def meta_int(path: str, meta: Mapping[str, str], key: str, minimum: int, fix: str) -> int:
    """``int(meta[key])``, checked ``>= minimum``; else a :class:`CorruptFileError`."""
    if key not in meta:
        raise CorruptFileError(path, f"its metadata has no {key!r} entry", fix)
    raw = meta[key]
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise CorruptFileError(
            path, f"metadata {key} {raw[:40]!r} is not an integer >= {minimum}", fix
        )
    return value


def _short(names: list[str]) -> str:
    return ", ".join(repr(k) for k in names[:5]) + (
        f" ... ({len(names)} in all)" if len(names) > 5 else ""
    )


def _read(
    path: str, what: str, *, tensors: bool = True
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The metadata and (with ``tensors``) the tensors of a safetensors file, on CPU."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"No {what} file at {path!r}.")
    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            out = {k: fh.get_tensor(k) for k in fh.keys()} if tensors else {}  # noqa: SIM118
    except Exception as exc:  # safetensors raises its own error types
        pickled = _torch_save_kind(path)
        if pickled:
            raise ValueError(
                f"{path!r} is not a natgrad {what} file: it looks like a torch.save file "
                f"({pickled}), and natgrad reads only the verified safetensors files its own "
                "save methods write (DiagonalFisher.save for a Fisher, e.g. "
                "natgrad.estimate_fisher(model, data).save(path); Curvature.save for a "
                "curvature). A {name: tensor} Fisher saved with torch.save converts with "
                "natgrad.DiagonalFisher(torch.load(path), n_samples).save(new_path)."
            ) from None
        raise ValueError(f"{path!r} is not a readable safetensors file: {exc}") from None
    return meta, out


def _torch_save_kind(path: str) -> str | None:
    """What a ``torch.save`` file at ``path`` looks like from its first bytes (a zip
    archive, torch's default since 1.6, or a bare pickle), or None for anything else."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
    except OSError:
        return None
    if len(head) == 9 and head[8:9] == b"{":
        # a safetensors header (8-byte length, then JSON), e.g. a truncated file whose
        # length bytes happen to start like a pickle (a 640-byte header: 80 02 ...)
        return None
    if head[:4] == b"PK\x03\x04":
        return "a zip archive"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "a pickle"
    return None


def read_format(path: str | os.PathLike[str], what: str = "natgrad") -> str | None:
    """The ``format`` entry of a file written by :func:`save_tensors` (None when its
    metadata has none), read from the header alone; nothing is verified here.

    Raises:
        FileNotFoundError: no such file (``what`` names the kind of file looked for).
        ValueError: not a safetensors file.
    """
    found = _read(os.fspath(path), what, tensors=False)[0].get("format")
    return found if isinstance(found, str) else None


def load_tensors(
    path: str | os.PathLike[str],
    kind: str,
    *,
    fix: str,
    what: str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and verify a file written by :func:`save_tensors` for ``kind``.

    Checks, in order: the file is safetensors; ``format == kind``; the format version;
    ``names`` / ``shapes`` / ``dtypes`` match the tensors; every tensor is
    floating-point; every SHA-256 matches. Values are not checked here (see
    :func:`find_invalid`).

    Args:
        path: the file.
        kind: the expected ``format`` entry.
        fix: what the user should do with a corrupt file (ends every corrupt message).
        what: the kind in words for messages (default: ``kind``), e.g. ``"Fisher"``.
        device: where the tensors go after verification.

    Returns:
        ``({name: tensor} in saved order, the whole metadata)``.

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: anything that does not verify.
        ValueError: not a safetensors file, another kind, or a format this version
            cannot read (older without checksums, or newer).
    """
    path = os.fspath(path)
    what = what or kind
    meta, tensors = _read(path, what)
    found = meta.get("format")
    if found != kind:
        if isinstance(found, str) and found.startswith("natgrad."):
            raise ValueError(f"{path!r} holds a {found}, not a {kind}; load it with {found}.load.")
        raise ValueError(
            f"{path!r} is a safetensors file but not a natgrad {what} (no format={kind!r} "
            f"metadata); {fix[0].lower() + fix[1:]}"
        )
    written_by = meta.get("natgrad_version", "unknown")
    if "format_version" not in meta:
        raise ValueError(
            f"{path!r} has format version 1 (written by natgrad {written_by}), which has no "
            f"checksums, so its contents cannot be verified. {fix}"
        )
    version = meta_int(path, meta, "format_version", 1, fix)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path!r} has format version {version}, written by a newer natgrad "
            f"({written_by}); this natgrad ({__version__}) reads up to version "
            f"{FORMAT_VERSION}: upgrade natgrad to read it."
        )
    if "meta_sha256" in meta and meta["meta_sha256"] != _meta_digest(meta):
        # (files written before the metadata had a checksum have none: read as before)
        raise CorruptFileError(
            path, "its metadata (n_samples, labels, names, ...) does not match its "
            "checksum: it was edited or damaged", fix
        )
    names = meta_json(path, meta, "names", fix)
    if not isinstance(names, list) or not all(isinstance(k, str) for k in names):
        raise CorruptFileError(path, "metadata 'names' must be a list of strings", fix)
    missing = [k for k in names if k not in tensors]
    if missing:
        raise CorruptFileError(
            path, f"tensors {missing[:5]} are listed in 'names' but missing", fix
        )
    extra = [k for k in tensors if k not in names]
    if extra:
        raise CorruptFileError(path, f"tensors {extra[:5]} are not listed in 'names'", fix)
    shapes = meta_json(path, meta, "shapes", fix)
    dtypes = meta_json(path, meta, "dtypes", fix)
    sums = meta_json(path, meta, "sha256", fix)
    for what, table in (("shapes", shapes), ("dtypes", dtypes), ("sha256", sums)):
        if not isinstance(table, dict):
            raise CorruptFileError(path, f"metadata {what!r} must be a JSON object", fix)
    no_sum = [k for k in names if k not in sums]
    if no_sum:
        raise CorruptFileError(path, f"there is no checksum for {_short(no_sum)}", fix)
    for k in names:
        t = tensors[k]
        if k not in shapes or shapes[k] != list(t.shape):
            raise CorruptFileError(
                path,
                f"tensor {k!r} has shape {tuple(t.shape)} but the metadata says {shapes.get(k)}",
                fix,
            )
        if not t.is_floating_point():
            raise CorruptFileError(
                path, f"tensor {k!r} is {_dtype_name(t.dtype)}, not floating-point", fix
            )
        if dtypes.get(k) != _dtype_name(t.dtype):
            raise CorruptFileError(
                path,
                f"tensor {k!r} is {_dtype_name(t.dtype)} but the metadata says {dtypes.get(k)}",
                fix,
            )
        got = tensor_sha256(t)
        if got != sums[k]:
            raise CorruptFileError(
                path,
                f"tensor {k!r} fails its SHA-256 checksum (stored {str(sums[k])[:12]}..., "
                f"computed {got[:12]}...): its bytes changed after it was written",
                fix,
            )
    device = str(device)
    return {k: tensors[k].to(device) for k in names}, meta
