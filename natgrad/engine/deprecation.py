"""Deprecated names: one place that warns, so renames keep working for one release."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

__all__ = ["deprecated_alias", "renamed_kwargs"]

F = TypeVar("F", bound=Callable[..., Any])


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; use {new} instead.",
        DeprecationWarning,
        stacklevel=3,
    )


def deprecated_alias(fn: F, old_name: str) -> F:
    """A copy of ``fn`` under ``old_name`` that warns (DeprecationWarning) on each call."""

    @functools.wraps(fn)
    def alias(*args: Any, **kwargs: Any) -> Any:
        _warn(old_name, fn.__name__)
        return fn(*args, **kwargs)

    alias.__name__ = old_name
    alias.__qualname__ = old_name
    alias.__doc__ = f"Deprecated alias of :func:`{fn.__name__}`."
    return cast(F, alias)  # functools.wraps keeps fn's signature


def renamed_kwargs(renames: Mapping[str, str]) -> Callable[[F], F]:
    """Decorator: accept the old keyword names in ``renames`` (``{old: new}``) with a warning.

    Passing both the old and the new name is a TypeError.
    """

    def deco(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            for old, new in renames.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(
                            f"{fn.__name__}() got both {old!r} (deprecated) and {new!r}; "
                            f"pass only {new!r}."
                        )
                    _warn(f"{fn.__name__}({old}=...)", f"{new}=...")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return cast(F, wrapper)  # functools.wraps keeps fn's signature

    return deco
