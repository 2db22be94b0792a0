"""The documentation site, the packaging files and the set-up commands stay in step."""

import ast
import importlib.util
import re
from pathlib import Path

import pytest

import natgrad

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


def _gen_api():
    spec = importlib.util.spec_from_file_location("gen_api", ROOT / "docs" / "gen_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    ci_cmds = [line.strip() for line in ci.splitlines() if line.strip()]
    assert ci_cmds == readme_cmds
    assert "mkdocs build --strict" in ci_cmds


def _extras():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


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
