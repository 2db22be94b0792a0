"""The documentation site, the packaging files and the set-up commands stay in step."""

import ast
import importlib.util
import re
from pathlib import Path

import pytest

import natgrad

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


def _load(name):
    import sys

    spec = importlib.util.spec_from_file_location(f"docs_{name}", ROOT / "docs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def _gen_api():
    return _load("gen_api")


def test_every_public_name_is_in_the_api_page():
    gen = _gen_api()
    page = (ROOT / "docs" / "api.md").read_text()
    assert gen.MARKER in page
    md = gen.on_page_markdown(page, page=None)
    blocks = re.findall(r"^::: natgrad\.(\S+)$", md, flags=re.M)
    missing = [n for n in natgrad.__all__ if n not in blocks]
    assert not missing, f"public names missing from the API page: {missing}"
    assert len(blocks) == len(set(blocks)), "a name is documented twice"
    assert "metrics" in blocks  # the registry module, documented as a whole


def test_api_groups_follow_the_all_comments():
    src = 'x = 1\n__all__ = [\n    "a",\n    # engine\n    "b",\n    "c",  # trailing\n    # uses: merging\n    "d",\n]\n'
    groups = _gen_api().public_groups(src)
    assert groups[0] == ("package", ["a"])
    assert groups[1] == ("engine", ["b", "c"])
    assert groups[-1] == ("uses: merging", ["d"])


def test_mkdocs_nav_pages_exist_and_hook_is_registered():
    cfg = (ROOT / "mkdocs.yml").read_text()
    assert "docs/gen_api.py" in cfg
    pages = re.findall(r":\s+(\S+\.md)\s*$", cfg, flags=re.M)
    assert len(pages) >= 18
    for page in pages:
        assert (ROOT / "docs" / page).is_file(), page


def _readme_steps():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n\s*```", readme, flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_steps_use_distinct_venvs():
    step1, step2 = _readme_steps()
    v1 = re.search(r"python3 -m venv (\S+)", step1).group(1)
    v2 = re.search(r"python3 -m venv (\S+)", step2).group(1)
    assert v1 != v2, (v1, v2)
    assert f". {v1}/bin/activate" in step1 and f". {v2}/bin/activate" in step2


def test_ci_runs_readme_step_2():
    _, step2 = _readme_steps()
    readme_cmds = [c.strip() for c in step2.split("&&")][2:]  # after venv + activate
    ci = (ROOT / ".ci" / "run").read_text().split("# --- README step 2 (tests) ---\n")[1]
    ci = ci.split("# --- CI gates beyond README step 2 ---")[0]
    ci_cmds = [line.strip() for line in ci.splitlines() if line.strip()]
    assert ci_cmds == readme_cmds
    assert "mkdocs build --strict" in ci_cmds


def _extras():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]



def test_readme_lists_every_extra():
    # the set-up section's "Extras:" sentence names each extra of pyproject.toml, in backticks
    readme = (ROOT / "README.md").read_text()
    sentence = readme.split("Extras: ", 1)[1].split("\n\n", 1)[0]
    missing = [e for e in _extras() if not re.search(rf"`{re.escape(e)}`\s+\(", sentence)]
    assert missing == [], f"README's Extras sentence does not name {missing}"

# What an example needs, by what it imports or calls.
NEEDS = {"load_digits": "scikit-learn", "load_mnist1d": "mnist1d", "transformers": "transformers",
         "matplotlib": "matplotlib", "sklearn": "scikit-learn"}


def test_each_example_names_the_install_that_covers_it():
    extras = _extras()
    for path in sorted((ROOT / "examples").glob("*.py")):
        src = path.read_text()
        doc = ast.get_docstring(ast.parse(src))
        m = re.search(r'pip install -e "\.\[([a-z,]+)\]"', doc)
        assert m, f"{path.name}: no install command in its header"
        assert f"Run: python examples/{path.name}" in doc, path.name
        names = m.group(1).split(",")
        assert "demo" in names, path.name
        covered = {re.split(r"[<>=\[]", d)[0] for n in names for d in extras[n]}
        needed = {dist for word, dist in NEEDS.items() if re.search(rf"\b{word}\b", src)}
        assert needed <= covered, f"{path.name} needs {needed - covered}"


def test_package_ships_typed_marker_and_license():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["license"] == "MIT"
    assert "py.typed" in meta["tool"]["setuptools"]["package-data"]["natgrad"]
    assert (ROOT / "natgrad" / "py.typed").is_file()
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert "## [Unreleased]" in (ROOT / "CHANGELOG.md").read_text()
    assert {"mkdocs", "mkdocs-material"} <= {re.split(r"[<>=\[]", d)[0] for d in _extras()["docs"]}


def test_bad_input_table_measures_every_case():
    bad = _load("bad_inputs")
    page = (ROOT / "docs" / "bad-inputs.md").read_text()
    assert bad.MARKER in page
    md = bad.on_page_markdown(page, page=None)
    rows = [r for r in md.splitlines() if r.startswith("| ") and r.endswith((" ✅ |", " ❌ |"))]
    cases = bad._cases()
    assert len(rows) == len(cases) >= 30
    handled = sum(r.endswith("✅ |") for r in rows)
    assert f"{handled} of {len(cases)} cases handled" in md


def test_bad_input_marks_follow_the_outcome():
    bad = _load("bad_inputs")

    def named():
        raise ValueError("x must be a tensor, got list; pass torch.tensor(x)")

    def silent():
        return None

    def torch_deep():
        import torch

        torch.zeros(2) + torch.zeros(3)

    assert bad.measure(bad.Case("g", "n", "error", "w", named))[0] is False  # not natgrad's code
    assert bad.measure(bad.Case("g", "n", "error", "w", silent)) == (
        False, "passes silently (no error, no warning)")
    ok, now = bad.measure(bad.Case("g", "n", "error", "w", torch_deep))
    assert not ok and "raised inside torch" in now
    assert bad.measure(bad.Case("g", "n", "correct", "w", lambda: True)) == (True, "correct")

    def warns_but_right():
        import warnings

        warnings.warn("slow path", RuntimeWarning, stacklevel=1)
        return True

    ok, now = bad.measure(bad.Case("g", "n", "correct", "w", warns_but_right))
    assert ok and now == "correct; warns `RuntimeWarning`: slow path"
    assert bad.measure(bad.Case("g", "n", "correct", "w", lambda: False))[0] is False
    from natgrad.engine.checks import check_int

    ok, now = bad.measure(bad.Case("g", "n", "error", "w", lambda: check_int("k", -1, 1)))
    assert ok and now.startswith("`ValueError`")


def test_docs_snippets_run(tmp_path):
    """Every ```python block of the documentation runs (one process, in a temp dir)."""
    import os
    import subprocess
    import sys

    blocks = []
    for md in sorted((ROOT / "docs").rglob("*.md")):
        blocks += [(md.name, b) for b in re.findall(r"```python\n(.*?)```", md.read_text(), re.S)]
    assert len(blocks) >= 12
    script = "\n".join(f"print('-- {name} {i}', flush=True)\n{code}" for i, (name, code) in enumerate(blocks))
    path = tmp_path / "docs_snippets.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"-- {blocks[-1][0]} {len(blocks) - 1}" in proc.stdout


def test_readme_to_dict_sentence_names_reports_and_curvatures():
    """README: "Every report object (...) has `to_dict()` ...; curvatures (...) have no
    `to_dict()`": each name it lists is what the sentence says it is."""
    import natgrad
    from natgrad.engine.report import Report

    readme = (ROOT / "README.md").read_text()
    sentence = readme.split("Every report object", 1)[1].split("Train-mode", 1)[0]
    reports, curvatures = sentence.split("curvatures", 1)
    report_names = re.findall(r"`([A-Z]\w+)`", reports)
    curvature_names = re.findall(r"`([A-Z]\w+)`", curvatures)
    assert len(report_names) >= 4 and len(curvature_names) >= 2
    for name in report_names:
        cls = getattr(natgrad, name, None) or getattr(natgrad.metrics, name)
        assert issubclass(cls, Report), name
    from natgrad.optim.precondition import PreconditionStep  # what pre.step returns

    assert issubclass(PreconditionStep, Report)
    for name in curvature_names:
        cls = getattr(natgrad, name)
        assert issubclass(cls, natgrad.Curvature) and not hasattr(cls, "to_dict"), name
        assert callable(cls.save) and callable(cls.state_dict)
