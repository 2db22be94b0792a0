"""``NaturalGradient``: an optimizer and a :class:`FisherPreconditioner` as one optimizer."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import torch

from natgrad.optim.precondition import FisherPreconditioner

__all__ = ["NaturalGradient"]


class NaturalGradient(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that preconditions the gradients, then steps ``optimizer``.

    ``step(closure=None, *, batch)`` runs ``closure`` (if given; it should zero the
    gradients, compute the loss, call ``backward`` and return the loss), then
    ``preconditioner.step(batch, lr=param_groups[0]["lr"])``, which rewrites ``.grad``
    with ``Δ = (F + λI)^-1 g``, then ``optimizer.step()``. The batch is passed explicitly
    because the curvature is measured on the batch the gradients came from.

    ``param_groups`` and ``state`` are the wrapped optimizer's (so learning-rate
    schedulers work on either object); ``state_dict()`` holds both states and
    round-trips with :meth:`load_state_dict`.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        preconditioner: a :class:`FisherPreconditioner` of the same model.

    Raises:
        TypeError: when the arguments have other types.

    Example:
        >>> import torch
        >>> from natgrad import FisherPreconditioner
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> opt = NaturalGradient(
        ...     torch.optim.SGD(model.parameters(), lr=0.1), FisherPreconditioner(model)
        ... )
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.cross_entropy(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure, batch=(x, y))
        >>> bool(loss > 0)
        True
    """

    def __init__(self, optimizer: torch.optim.Optimizer, preconditioner: FisherPreconditioner):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}; "
                "e.g. NaturalGradient(torch.optim.SGD(model.parameters(), lr=0.1), pre)."
            )
        if not isinstance(preconditioner, FisherPreconditioner):
            raise TypeError(
                f"preconditioner must be a natgrad.FisherPreconditioner, got "
                f"{type(preconditioner).__name__}."
            )
        # Not Optimizer.__init__: the parameter groups and state stay the wrapped optimizer's.
        self.optimizer = optimizer
        self.preconditioner = preconditioner
        self.defaults = optimizer.defaults
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    def step(  # type: ignore[override]
        self, closure: Callable[[], Any] | None = None, *, batch: Any = None
    ) -> Any:
        """Precondition ``.grad`` on ``batch``, then step the wrapped optimizer.

        Returns:
            The closure's loss, or None without a closure.

        Raises:
            ValueError: when ``batch`` is missing.
        """
        if batch is None:
            raise ValueError(
                "NaturalGradient.step needs the batch the gradients came from: "
                "opt.step(closure, batch=(x, y)) or opt.step(batch=(x, y))."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for hook in list(self._optimizer_step_pre_hooks.values()):
            hook(self, (), {})
        self.preconditioner.step(batch, lr=self.param_groups[0]["lr"])
        self.optimizer.step()
        for hook in list(self._optimizer_step_post_hooks.values()):
            hook(self, (), {})
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimizer's gradients (``None`` by default, like torch.optim)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (the preconditioner keeps its own params)."""
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": ..., "preconditioner": ...}``."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "preconditioner": self.preconditioner.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore both states from :meth:`state_dict`'s output.

        Raises:
            ValueError: when ``state_dict`` lacks either part, or the preconditioner's part
                is for another model (checked before either part is loaded).
        """
        if not isinstance(state_dict, Mapping) or not {"optimizer", "preconditioner"} <= set(
            state_dict
        ):
            raise ValueError(
                "Not a NaturalGradient state_dict: expected keys 'optimizer' and "
                "'preconditioner' (save it with NaturalGradient.state_dict())."
            )
        # the preconditioner's state is checked first, so a mismatch changes neither part
        self.preconditioner.check_state_dict(state_dict["preconditioner"])
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.preconditioner.load_state_dict(state_dict["preconditioner"])

    def __repr__(self) -> str:
        return f"NaturalGradient({self.optimizer.__class__.__name__}, {self.preconditioner!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
