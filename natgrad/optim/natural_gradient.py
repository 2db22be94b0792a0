"""``NaturalGradient``: an optimizer and a :class:`FisherPreconditioner` as one optimizer."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from natgrad.optim.precondition import FisherPreconditioner

__all__ = ["NaturalGradient"]


class NaturalGradient(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that preconditions the gradients, then steps ``optimizer``.

    ``step(closure=None, *, batch=None)`` runs ``closure`` (if given; it should zero the
    gradients, compute the loss, call ``backward`` and return the loss), then
    ``preconditioner.step(batch, lr=...)``, which rewrites ``.grad`` with
    ``Δ = (F + λI)^-1 g`` (scaled by the ``kl_clip`` trust region), then
    ``optimizer.step()``. The ``lr`` passed is each preconditioned parameter's group
    learning rate, read from ``param_groups`` at every step (so schedulers are followed;
    a parameter outside the optimizer, which does not move, counts with lr 0). With a
    ``FisherPreconditioner(source="batch")`` the batch is passed explicitly, because the
    curvature is measured on the batch the gradients came from; with
    ``source="backward"`` the statistics come from the closure's (or your own) forward and
    backward, so ``step(closure)`` works as for any ``torch.optim`` optimizer (the
    Hugging Face Trainer and Lightning call it so).

    torch's optimizer hooks work as on any optimizer, registered through its public API:
    ``register_step_pre_hook`` / ``register_step_post_hook`` (called around the whole
    step, closure included, with the global optimizer hooks; a global hook is called
    again for the wrapped optimizer's own step, so it runs twice per step),
    ``register_state_dict_pre_hook`` / ``register_state_dict_post_hook`` and
    ``register_load_state_dict_pre_hook`` / ``register_load_state_dict_post_hook``
    (called by :meth:`state_dict` / :meth:`load_state_dict` with torch's signatures).

    ``param_groups`` and ``state`` are the wrapped optimizer's (so learning-rate
    schedulers work on either object); ``state_dict()`` holds both states and
    round-trips with :meth:`load_state_dict`.

    Args:
        optimizer: any ``torch.optim.Optimizer`` over the model's parameters.
        preconditioner: a :class:`FisherPreconditioner` of the same model.

    Raises:
        TypeError: when the arguments have other types.
        ValueError: the preconditioner's parameters are none of the optimizer's.

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
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if not any(id(p) in in_opt for p in preconditioner.params.values()):
            raise ValueError(
                "The preconditioner's parameters are none of the optimizer's, so the "
                "optimizer would step unpreconditioned gradients: build both on the same "
                "model, NaturalGradient(torch.optim.SGD(model.parameters(), lr=...), "
                "FisherPreconditioner(model, ...))."
            )
        self.optimizer = optimizer
        self.preconditioner = preconditioner
        # torch.optim.Optimizer.__init__ sets up the hook registries and the step wrapper
        # that calls the step hooks; while it runs, param_groups / state / add_param_group
        # act on a scratch copy, so the wrapped optimizer's groups and state stay its own.
        self.__dict__["_scratch"] = {"param_groups": [], "state": {}}
        try:
            groups = [{"params": list(g["params"])} for g in optimizer.param_groups]
            super().__init__(groups, optimizer.defaults)
        finally:
            del self.__dict__["_scratch"]
        self.defaults = optimizer.defaults

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        if "_scratch" in self.__dict__:
            groups: list[dict[str, Any]] = self.__dict__["_scratch"]["param_groups"]
            return groups
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if "_scratch" in self.__dict__:
            self.__dict__["_scratch"]["param_groups"] = value
        else:
            self.optimizer.param_groups = value

    @property
    def state(self) -> Any:
        if "_scratch" in self.__dict__:
            return self.__dict__["_scratch"]["state"]
        return self.optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        if "_scratch" in self.__dict__:
            self.__dict__["_scratch"]["state"] = value
        else:
            self.optimizer.state = value

    def step(
        self, closure: Callable[[], Any] | None = None, *, batch: Any = None
    ) -> Any:
        """Precondition ``.grad``, then step the wrapped optimizer.

        Args:
            closure: zeroes the gradients, computes the loss, calls ``backward`` and returns
                the loss (optional).
            batch: the batch the gradients came from; required when the preconditioner's
                ``source="batch"`` refreshes its curvature, ignored with ``"backward"``.

        Returns:
            The closure's loss, or None without a closure.

        Raises:
            ValueError: when ``batch`` is missing and the preconditioner needs it.
        """
        pre = self.preconditioner
        if batch is None and pre.source == "batch":
            raise ValueError(
                "NaturalGradient.step needs the batch the gradients came from: "
                "opt.step(closure, batch=(x, y)) or opt.step(batch=(x, y)); or build the "
                "FisherPreconditioner with source='backward' to record the statistics during "
                "the closure's forward and backward."
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        pre.step(batch, lr=self.param_lrs())
        self.optimizer.step()
        return loss

    def param_lrs(self) -> dict[str, float]:
        """``{name: lr}`` for the preconditioner's parameters: the ``lr`` of the group
        holding each (0 for a parameter in no group: the optimizer does not move it)."""
        return self.preconditioner.group_lrs(self.param_groups)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the wrapped optimizer's gradients (``None`` by default, like torch.optim),
        and drop the preconditioner's records of the backward passes that made them
        (:meth:`FisherPreconditioner.zero_grad_records`: a step skipped by a
        ``GradScaler`` leaves no stale statistics)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.preconditioner.zero_grad_records()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the wrapped optimizer (the preconditioner keeps its own params)."""
        if "_scratch" in self.__dict__:  # inside Optimizer.__init__
            super().add_param_group(param_group)
        else:
            self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": ..., "preconditioner": ...}``, through torch's state-dict hooks
        (pre hooks ``hook(self)``; post hooks ``hook(self, state_dict)`` may return a
        replacement)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict: dict[str, Any] = {
            "optimizer": self.optimizer.state_dict(),
            "preconditioner": self.preconditioner.state_dict(),
        }
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state_dict)
            if result is not None:
                state_dict = result
        return state_dict

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore both states from :meth:`state_dict`'s output, through torch's
        load-state-dict hooks (pre hooks ``hook(self, state_dict)`` may return a
        replacement; post hooks ``hook(self)``).

        Raises:
            ValueError: when ``state_dict`` lacks either part, or the preconditioner's part
                is for another model (checked before either part is loaded).
        """
        if isinstance(state_dict, Mapping):
            state_dict = dict(state_dict)  # shallow copy, as torch does
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, state_dict)
            if result is not None:
                state_dict = result
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
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __repr__(self) -> str:
        return f"NaturalGradient({self.optimizer.__class__.__name__}, {self.preconditioner!r})"

    def __getstate__(self) -> dict[str, Any]:
        return self.__dict__

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
