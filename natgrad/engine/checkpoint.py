"""Resumable Fisher passes: atomic checkpoints of partial sums.

A pass over ``B`` batches accumulates ``S = Σ_n Σ_j w_j g_nj²`` and ``N``. Every
``checkpoint_every`` batches the state ``(S, N, batches done, MC generator state)`` is
written to a temporary file beside the target and moved into place with ``os.replace``
(atomic on POSIX and Windows), so a killed process leaves either the previous or the
new checkpoint, never a torn one. The file also holds a fingerprint of the run
(label source, likelihood, MC samples, engine, parameter names, shapes and a checksum
of their values); a rerun with the same arguments skips the batches already done and,
because the sums are restored bit for bit and the generator state with them, returns
the same Fisher as an uninterrupted run.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

__all__ = ["run_fingerprint", "save_checkpoint", "load_checkpoint"]

_FORMAT = 1


def run_fingerprint(params: dict[str, torch.Tensor], **options: Any) -> dict[str, Any]:
    """What identifies a Fisher pass: options, parameter names/shapes, a value checksum.

    The checksum is ``Σ_i θ_i · (1 + i mod 7)`` per parameter in float64, enough to tell
    a trained model from the one a checkpoint was written for.

    Example:
        >>> import torch
        >>> fp = run_fingerprint({"w": torch.ones(2)}, labels="mc")
        >>> fp["shapes"], fp["options"]
        ({'w': (2,)}, {'labels': 'mc'})
    """
    sums = {}
    for k, p in params.items():
        v = p.detach().reshape(-1).double()
        ramp = 1 + torch.arange(v.numel(), device=v.device, dtype=torch.float64) % 7
        sums[k] = round(float((v * ramp).sum()), 6)
    return {
        "options": {k: options[k] for k in sorted(options)},
        "shapes": {k: tuple(p.shape) for k, p in params.items()},
        "checksum": sums,
    }


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically (temporary file in the same folder + ``os.replace``).

    Example:
        >>> import os, tempfile, torch
        >>> p = os.path.join(tempfile.mkdtemp(), "f.pt")
        >>> save_checkpoint(p, {"n": 3})
        >>> load_checkpoint(p)["n"]
        3
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".natgrad-ckpt-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save({"format": _FORMAT, **state}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The state saved at ``path``, or None when there is no file.

    The state holds ``fingerprint``, ``sums`` (float32 ``{name: tensor}``), ``n_samples``,
    ``batches_done`` and ``generator_state``: enough to see how far a pass got.

    Raises:
        ValueError: the file is not a natgrad Fisher checkpoint.

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
        raise ValueError(
            f"{path!r} is not a readable natgrad Fisher checkpoint ({err}); delete it or pass "
            "another checkpoint path."
        ) from None
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(
            f"{path!r} is not a natgrad Fisher checkpoint (format {_FORMAT}); delete it or "
            "pass another checkpoint path."
        )
    return state


def check_same_run(path: str, saved: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """Raise ValueError naming what differs between a checkpoint and the current run."""
    old = saved["fingerprint"]
    diffs = []
    for key in ("options", "shapes", "checksum"):
        if old[key] != fingerprint[key]:
            names = sorted(
                k
                for k in set(old[key]) | set(fingerprint[key])
                if old[key].get(k) != fingerprint[key].get(k)
            )
            label = {"checksum": "parameter values"}.get(key, key)
            diffs.append(f"{label} ({', '.join(map(str, names[:6]))})")
    if diffs:
        raise ValueError(
            f"The checkpoint {path!r} was written by a different Fisher pass: "
            + "; ".join(diffs)
            + " differ. Rerun with the same model and arguments to resume, or delete the "
            "file (or pass another checkpoint path) to start over."
        )
