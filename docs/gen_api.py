"""Build the API reference from ``natgrad.__all__`` (a mkdocs hook).

``docs/api.md`` holds the marker ``<!-- natgrad-api -->``; at build time the hook
replaces it with one ``::: natgrad.<name>`` block per public name, grouped as the
comments in ``natgrad/__init__.py``'s ``__all__`` group them. A name added to
``__all__`` therefore appears in the reference without editing the page, and
``tests/test_docs.py`` checks that none is missing.

Run ``python docs/gen_api.py`` to print the generated Markdown.
"""

from __future__ import annotations

import ast
import io
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INIT = ROOT / "natgrad" / "__init__.py"
MARKER = "<!-- natgrad-api -->"
# Modules documented as a whole, after the flat namespace (imported on first access).
SUBMODULES = {
    "natgrad.metrics": "The metrics registry (`from natgrad.metrics import MetricContext, registry`).",
}


def public_groups(source: str | None = None) -> list[tuple[str, list[str]]]:
    """``[(group title, [names])]`` from ``__all__`` in ``natgrad/__init__.py``.

    A comment line inside the ``__all__`` list starts a group; names before the first
    comment form the group "package".
    """
    source = INIT.read_text(encoding="utf-8") if source is None else source
    tree = ast.parse(source)
    span = None
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            span = (node.lineno, node.end_lineno)
    if span is None:
        raise RuntimeError(f"no literal __all__ in {INIT}")
    groups: list[tuple[str, list[str]]] = [("package", [])]
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if not span[0] <= tok.start[0] <= span[1]:
            continue
        if tok.type == tokenize.COMMENT:
            groups.append((tok.string.lstrip("#").strip(), []))
        elif tok.type == tokenize.STRING:
            groups[-1][1].append(ast.literal_eval(tok.string))
    return [(title, names) for title, names in groups if names]


def api_markdown() -> str:
    """The Markdown that replaces the marker: one ``:::`` block per public name."""
    lines: list[str] = []
    for title, names in public_groups():
        lines += [f"## {title[:1].upper() + title[1:]}", ""]
        for name in names:
            lines += [f"::: natgrad.{name}", ""]
    for module, blurb in SUBMODULES.items():
        lines += [f"## `{module}`", "", blurb, "", f"::: {module}", "    options:",
                  "      show_root_heading: false", "      heading_level: 3", ""]
    return "\n".join(lines)


def on_page_markdown(markdown: str, page, **kwargs) -> str:  # mkdocs hook
    """Replace the marker on the API page with the generated reference."""
    if MARKER in markdown:
        return markdown.replace(MARKER, api_markdown())
    return markdown


if __name__ == "__main__":
    print(api_markdown())
