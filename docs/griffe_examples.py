"""A griffe extension: natgrad's ``Example:`` docstring sections render as examples.

Google-style docstrings name the doctest section ``Examples:``; natgrad's docstrings
write ``Example:``, which griffe would otherwise render as a plain admonition (the
``>>>`` lines joined as prose). Registered in ``mkdocs.yml`` under the python handler's
``extensions``.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:[ \t]*$", flags=re.M)


class ExampleSections(griffe.Extension):
    """Rename ``Example:`` section headers to ``Examples:`` before parsing."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _EXAMPLE.sub(r"\1Examples:", obj.docstring.value)
