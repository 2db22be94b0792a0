"""The ``natgrad`` command end to end, in subprocesses (as a user runs it)."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from natgrad import DiagonalFisher
from natgrad.cli.main import main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(*args, cwd=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "natgrad", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


class Done:
    """What a command run in this process left: exit status, stdout, stderr."""

    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def call(capsys, *args):
    """``main(args)`` in this process (cheaper than a subprocess; same code path)."""
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse errors and --version exit
        code = exc.code
    out = capsys.readouterr()
    return Done(code, out.out, out.err)


def assert_one_line_error(proc, code, pattern):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("natgrad: error: ")
    assert re.search(pattern, lines[0]), lines[0]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    pytest.importorskip("mnist1d")
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("demo") / "out"
    proc = run("demo", "--quick", "--seed", "0", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_demo_quick_writes_everything(demo_dir):
    out, proc = demo_dir
    assert "| section | quantity | value |" in proc.stdout
    assert "[" in proc.stderr and "s] generating MNIST-1D" in proc.stderr  # progress lines
    report = (out / "report.md").read_text()
    assert report.startswith("# natgrad demo") and "## Results" in report
    from natgrad.cli.demo.common import OUTPUTS  # what --force guards: every file written

    assert set(os.listdir(out)) <= set(OUTPUTS)
    pngs = sorted(p.name for p in out.glob("*.png"))
    for name in [
        "accuracy_vs_sparsity.png",
        "fisher_layer_mass.png",
        "forgetting_curves.png",
        "training_curves.png",
    ]:
        assert name in pngs
    for p in pngs:
        assert (out / p).read_bytes()[:8] == PNG_MAGIC
        assert f"]({p})" in report  # every plot is shown in the report
    data = json.loads((out / "metrics.json").read_text())
    assert data["config"]["quick"] is True and data["config"]["seed"] == 0
    sections = data["sections"]
    for key in [
        "base",
        "fisher",
        "interference",
        "forgetting",
        "pruning",
        "merging",
        "uncertainty",
    ]:
        assert key in sections
    assert 0.0 <= sections["base"]["test_acc"][-1] <= 1.0
    assert set(sections["fisher"]) >= {"empirical", "mc", "exact"}
    metrics = data["metrics"]
    assert "fisher_information" in metrics["results"]
    assert metrics["failed"] == {}
    # Every AUROC is a probability; the saved Fisher files load back.
    for v in sections["uncertainty"]["auroc"].values():
        assert 0.0 <= v["laplace_epistemic"] <= 1.0
    fa = DiagonalFisher.load(out / "fisher_task_A.safetensors")
    assert fa.n_samples == 1000


def test_demo_report_reads_as_one_story(demo_dir, tmp_path, capsys):
    """The saved Fishers are the ones the interference section compares; one top-k
    meaning; per-layer cosines; a reliability diagram; one-shot and fine-tuned pruning
    plots apart; registry values shown with their context; no timings in value cells."""
    from natgrad import compare_task_fisher

    out, proc = demo_dir
    data = json.loads((out / "metrics.json").read_text())
    inter = data["sections"]["interference"]
    fa = DiagonalFisher.load(out / "fisher_task_A.safetensors")
    fb = DiagonalFisher.load(out / "fisher_task_B.safetensors")
    c = compare_task_fisher(fa, fb, top_k=0.05)
    assert c.cosine == pytest.approx(inter["comparison"]["cosine"], rel=1e-5)
    assert c.topk_jaccard == pytest.approx(inter["comparison"]["topk_jaccard"], rel=1e-6)
    for layer, cos in inter["cosine_per_layer"].items():
        assert c.per_layer[layer].cosine == pytest.approx(cos, rel=1e-5)
    assert set(inter["cosine_per_layer"]) == {"body.0", "body.2", "head"}
    # `natgrad report` on the saved files gives the demo's similarity, under the same name
    rep = call(capsys, "report", str(out / "fisher_task_A.safetensors"),
               str(out / "fisher_task_B.safetensors"), "--out", str(tmp_path / "r"))  # fmt: skip
    assert rep.returncode == 0, rep.stderr
    report_json = json.loads((tmp_path / "r" / "report.json").read_text())
    (cmp,) = report_json["comparisons"].values()
    assert cmp["cosine"] == pytest.approx(inter["comparison"]["cosine"], rel=1e-5)
    assert cmp["topk_jaccard"] == pytest.approx(inter["comparison"]["topk_jaccard"], rel=1e-6)
    text = (out / "report.md").read_text() + (tmp_path / "r" / "report.md").read_text()
    assert "top-k" not in text and "Jaccard of the top-5% coordinates" in text
    assert "Cosine per layer" in text
    for png in ("reliability.png", "accuracy_vs_sparsity_fine_tuned.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC
    rows = dict(data["sections"]["metrics"]["rows"])
    assert rows["context"].startswith("models[0] = the base model")
    assert "fisher_information: trace" in rows
    table = proc.stdout[proc.stdout.index("| section | quantity | value |"):]
    cells = [line.rsplit("|", 2)[-2] for line in table.splitlines() if line.startswith("|")]
    assert not [v for v in cells if re.search(r"\d s\)|\(\d+(\.\d+)? ?s\b|Adam's time", v)]


def test_report_on_demo_fishers(demo_dir, tmp_path, capsys):
    out, _ = demo_dir
    files = [str(out / "fisher_task_A.safetensors"), str(out / "fisher_task_B.safetensors")]
    proc = call(capsys, "report", *files, "--out", str(tmp_path / "r"), "--top", "4")
    assert proc.returncode == 0, proc.stderr
    assert "Pairwise similarity" in proc.stdout
    assert (tmp_path / "r" / "fisher_layer_mass.png").read_bytes()[:8] == PNG_MAGIC


def test_report_numbers_match_hand_computation(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    a = DiagonalFisher(
        {"l1.weight": torch.tensor([[1.0, 0.0], [3.0, 0.5]]), "l2.bias": torch.tensor([2.0, 0.25])},
        n_samples=5,
    )
    b = DiagonalFisher(
        {"l1.weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "l2.bias": torch.tensor([4.0, 0.0])},
        n_samples=3,
        labels="exact",
    )
    a.save(tmp_path / "a.safetensors")
    b.save(tmp_path / "b.safetensors")
    out = tmp_path / "out"
    proc = call(capsys, "report", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                "--out", str(out), "--top", "2")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads((out / "report.json").read_text())
    fa = data["fishers"]["a"]
    assert fa["n_samples"] == 5 and fa["trace"] == pytest.approx(6.75)
    assert fa["layer_totals"] == {"l1": pytest.approx(4.5), "l2": pytest.approx(2.25)}
    assert fa["top_coordinates"] == [["l1.weight", [1, 0], 3.0], ["l2.bias", [0], 2.0]]
    va = torch.tensor([1.0, 0.0, 3.0, 0.5, 2.0, 0.25], dtype=torch.float64)
    vb = torch.tensor([0.0, 1.0, 1.0, 0.0, 4.0, 0.0], dtype=torch.float64)
    cos = float(va @ vb / (va.norm() * vb.norm()))
    assert data["comparisons"]["a vs b"]["cosine"] == pytest.approx(cos, rel=1e-6)
    report = (out / "report.md").read_text()
    assert "| l1 | 4.5 | 66.7% |" in report


def test_metrics_lists_registry(capsys):
    from natgrad.metrics import registry

    proc = call(capsys, "metrics")
    assert proc.returncode == 0, proc.stderr
    for name in registry.names():
        assert name in proc.stdout
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("fisher_information "))
    assert line.split()[1:] == ["standard", "model,", "batch"]
    js = json.loads(call(capsys, "metrics", "--json").stdout)
    assert [m["name"] for m in js] == registry.names()
    assert {m["name"]: m["signature"] for m in js}["fisher_information"] == "standard"


def test_console_script_installed():
    script = os.path.join(os.path.dirname(sys.executable), "natgrad")
    assert os.path.exists(script), "pip install -e . installs the natgrad command"
    proc = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("natgrad ")


def test_error_in_a_real_process(tmp_path):
    proc = run("report", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path))
    assert_one_line_error(proc, 1, r"no such Fisher file: '.*nope\.safetensors'")
    assert proc.stdout == ""


def test_error_not_a_fisher(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    proc = call(capsys, "report", str(bad), "--out", str(tmp_path))
    assert_one_line_error(proc, 1, r"is not a readable safetensors file")


def test_error_unwritable_dir(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a directory cannot be created below a file (even as root)
    proc = call(capsys, "demo", "--quick", "--out", str(blocker / "sub"))
    assert_one_line_error(proc, 1, r"cannot write to output directory .*; pass --out")
    f = tmp_path / "f.safetensors"
    DiagonalFisher({"w": torch.ones(2)}, 1).save(f)
    proc = call(capsys, "report", str(f), "--out", str(blocker / "sub"))
    assert_one_line_error(proc, 1, r"cannot write to output directory")


@pytest.mark.parametrize(
    "args, pattern",
    [
        (["demo", "--seed", "x"], r"argument --seed: invalid int value: 'x'"),
        (["demo", "--seed", "-1"], r"--seed must be >= 0, got -1"),
        (["report"], r"the following arguments are required: FISHER_FILE"),
        (["report", "a.safetensors", "--top", "0"], r"--top must be >= 1, got 0"),
        (["frobnicate"], r"invalid choice: 'frobnicate'"),
        (["demo", "--bogus"], r"unrecognized arguments: --bogus"),
    ],
)
def test_error_bad_arguments(args, pattern, capsys):
    proc = call(capsys, *args)
    assert_one_line_error(proc, 2, pattern)
    assert proc.stdout == ""
    if "must be >=" in pattern:  # was exit 1 without the hint for --seed -1
        assert proc.stderr.strip().endswith("(see 'natgrad --help')")


def test_no_command_prints_help(capsys):
    proc = call(capsys)
    assert proc.returncode == 2
    assert "demo" in proc.stderr and "report" in proc.stderr and "metrics" in proc.stderr


def test_report_different_architectures_not_compared(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    DiagonalFisher({"w": torch.tensor([1.0, 2.0])}, 2).save(tmp_path / "a.safetensors")
    DiagonalFisher({"v": torch.tensor([1.0])}, 1).save(tmp_path / "a2.safetensors")
    DiagonalFisher({"w": torch.tensor([1.0, 2.0])}, 2).save(tmp_path / "sub.safetensors")
    proc = call(capsys, "report", str(tmp_path / "a.safetensors"), str(tmp_path / "a2.safetensors"),
                str(tmp_path / "sub.safetensors"), "--out", str(tmp_path / "o"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "| a | a2 | different parameters: not comparable |" in proc.stdout
    data = json.loads((tmp_path / "o" / "report.json").read_text())
    assert data["comparisons"]["a vs sub"]["cosine"] == pytest.approx(1.0)
    assert set(data["comparisons"]) == {"a vs sub"}


@pytest.mark.parametrize("kind", ["kfac", "lowrank"])
def test_report_on_a_curvature_file_says_what_it_reads(kind, tmp_path, capsys):
    import natgrad

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    curvature = natgrad.estimate_curvature(
        model, (torch.randn(6, 3), torch.randint(0, 2, (6,))), kind=kind
    )
    path = tmp_path / "c.safetensors"
    curvature.save(path)
    proc = call(capsys, "report", str(path), "--out", str(tmp_path / "o"))
    # was "... load it with natgrad.KroneckerFisher.load", a Python hint for a CLI user
    assert_one_line_error(
        proc, 1, r"holds a curvature of kind .*natgrad report reads diagonal Fisher files only"
    )
    assert "load it with" not in proc.stderr
    # the advice works
    pytest.importorskip("matplotlib")
    natgrad.DiagonalFisher(curvature.diagonal(), curvature.n_samples).save(path)
    proc = call(capsys, "report", str(path), "--out", str(tmp_path / "o"))
    assert proc.returncode == 0, proc.stderr


def test_a_closed_stdout_pipe_is_not_reported_as_an_error():
    """``natgrad metrics --json | head -c 10``: the reader leaves before the output is
    written; the command exits without a ``BrokenPipeError`` message or traceback."""
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-m", "natgrad", "metrics", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()  # before the interpreter has even imported natgrad
    _, err = proc.communicate(timeout=120)
    assert b"BrokenPipe" not in err and b"Traceback" not in err, err.decode()
    assert proc.returncode != 0
