"""Framework integrations: natgrad inside the Hugging Face ``Trainer`` and Lightning.

Each integration is a submodule, imported on its own so that ``import natgrad`` never
imports a training framework:

* :mod:`natgrad.integrations.huggingface`: ``transformers.Trainer`` callbacks and a
  ``compute_loss_func`` (``pip install 'natgrad[integrations]'`` or ``pip install transformers``).
* :mod:`natgrad.integrations.lightning`: Lightning callbacks and a ``LightningModule``
  mixin (``pip install 'natgrad[integrations]'`` or ``pip install lightning``).

Both use only the frameworks' own extension points (callbacks, the loss hook, the
module's ``backward`` hook), never a training loop of their own, and cover the same
uses: the EWC penalty added to the training loss, a Fisher estimated at the end of
training and saved next to the checkpoints (:meth:`natgrad.DiagonalFisher.save`), and
Fisher metrics logged to the framework's logger every ``every_n_steps`` steps.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]


def require(module: str, package: str, integration: str) -> ModuleType:
    """Import ``module`` or raise an ``ImportError`` that names the pip command.

    Args:
        module: the module to import (e.g. ``"transformers"``).
        package: the PyPI package that provides it (e.g. ``"lightning"``).
        integration: the natgrad module that needs it, for the message.

    Returns:
        The imported module.

    Raises:
        ImportError: the framework is not installed; the message names both
            ``pip install 'natgrad[integrations]'`` and ``pip install <package>``.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{integration} needs the {package!r} package, which is not installed "
            f"({exc}). Install it with: pip install 'natgrad[integrations]' "
            f"(or pip install {package})."
        ) from exc
