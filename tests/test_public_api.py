"""The public namespace: README's API table lists exactly ``natgrad.__all__``; nothing private
crosses modules."""

import pathlib
import re
import types

import natgrad

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _api_table_names() -> set[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## API overview", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    tokens = set(re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", "\n".join(rows)))
    # names that are natgrad attributes (modules such as `metrics` are not API names)
    return {
        t for t in tokens
        if hasattr(natgrad, t) and not isinstance(getattr(natgrad, t), types.ModuleType)
    }


def test_readme_api_table_equals_all():
    public = set(natgrad.__all__) - {"__version__"}
    table = _api_table_names()
    assert public - table == set(), f"in __all__ but not in README's API table: {public - table}"
    assert table - public == set(), f"in README's API table but not in __all__: {table - public}"


def test_every_name_in_all_exists_once():
    assert len(natgrad.__all__) == len(set(natgrad.__all__))
    for name in natgrad.__all__:
        assert hasattr(natgrad, name), name


def test_no_private_name_is_imported_across_modules():
    pattern = re.compile(r"^\s*from natgrad[.\w]* import (.*)$")
    offenders = []
    for path in (ROOT / "natgrad").rglob("*.py"):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            m = pattern.match(line)
            if not m:
                continue
            names = m.group(1)
            if names.strip() == "(":
                j = i + 1
                names = ""
                while j < len(lines) and ")" not in lines[j]:
                    names += lines[j]
                    j += 1
            for name in re.split(r"[,\s()]+", names):
                base = name.split(" as ")[0].strip()
                if base.startswith("_") and base not in {"__version__", "__future__"}:
                    offenders.append(f"{path.relative_to(ROOT)}:{i + 1}: {base}")
    assert offenders == []


def test_readme_metrics_row_names_import_from_natgrad_metrics():
    # the API table's natgrad.metrics row: classes import from natgrad.metrics; the rest are
    # natgrad.metrics names or methods of its registry
    import natgrad.metrics as metrics

    text = (ROOT / "README.md").read_text()
    section = text.split("## API overview", 1)[1].split("\n## ", 1)[0]
    (row,) = [line for line in section.splitlines() if line.startswith("| metrics |")]
    tokens = re.findall(r"`([A-Za-z_][A-Za-z0-9_]*)`", row)
    assert "MetricResults" in tokens
    for t in tokens:
        if t[0].isupper():
            assert t in metrics.__all__ and hasattr(metrics, t), f"README lists {t} there"
        else:
            assert t in metrics.__all__ or hasattr(metrics.registry, t), t
