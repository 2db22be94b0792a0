"""Every example runs as a user runs it (a subprocess) and prints what it promises."""

import os
import re
import subprocess
import sys

import pytest
import torch

# Subprocesses import this checkout's natgrad (PYTHONPATH), not another installed copy.
EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def run_example(name, *args, tmp_path):
    # The examples' models are tiny: one thread avoids oversubscribing a shared CI machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(EXAMPLES)}
    proc = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, name), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    return proc.stdout


def _floats(pattern, text):
    return [float(v) for v in re.findall(pattern, text)]


def test_prune_and_save(tmp_path):
    pytest.importorskip("sklearn")
    path = tmp_path / "pruned.pt"
    out = run_example("prune_and_save.py", str(path), tmp_path=tmp_path)
    assert "80% of weights are zero" in out
    state = torch.load(path)
    assert not any(k.endswith(("_orig", "_mask")) for k in state)  # made permanent
    weights = [v for k, v in state.items() if k.endswith("weight")]
    zero = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zero == pytest.approx(0.8, abs=1e-3)
    (tuned,) = _floats(r"fine-tuned: accuracy ([0-9.]+)", out)
    (reloaded,) = _floats(r"reloaded accuracy ([0-9.]+)", out)
    assert reloaded == tuned


@pytest.mark.slow
def test_quickstart(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example("quickstart.py", tmp_path=tmp_path)
    assert "exact: trace" in out


@pytest.mark.slow
def test_wrap_optimizer(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example("wrap_optimizer.py", tmp_path=tmp_path)
    losses = _floats(r"test loss ([0-9.]+)", out)
    assert len(losses) == 3 and all(v < 2.3 for v in losses)  # every variant learns


@pytest.mark.slow
def test_ewc_training_loop(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example("ewc_training_loop.py", tmp_path=tmp_path)
    plain, ewc = _floats(r"accuracy on A ([0-9.]+), on B", out)
    assert ewc > plain + 0.2  # EWC keeps much more of task A


@pytest.mark.slow
def test_merge_models(tmp_path):
    pytest.importorskip("sklearn")
    out = run_example("merge_models.py", tmp_path=tmp_path)
    accs = dict(
        (name.strip(), (float(a), float(b)))
        for name, a, b in re.findall(r"^\s*(.+?)\s+([0-9.]+) / ([0-9.]+)$", out, re.M)
    )
    assert set(accs) == {"fine-tuned on 0-4", "fine-tuned on 5-9", "plain average", "Fisher merge"}
    assert sum(accs["Fisher merge"]) > sum(accs["fine-tuned on 0-4"])


@pytest.mark.slow
def test_hf_metrics(tmp_path):
    pytest.importorskip("transformers")
    out = run_example("hf_metrics.py", tmp_path=tmp_path)
    assert "computed  fisher_information" in out
    assert "failed" not in out


def test_hf_metrics_report_part_runs_fast(capsys):
    """The part of examples/hf_metrics.py after ``compute_all`` (the report, which read
    ``ctx.fisher["task_a"]``: a KeyError, the context never writes there) runs, as the
    file has it, on a tiny MLP context (the example itself is slow: BERT)."""
    from natgrad.metrics import MetricContext, registry

    with open(os.path.join(EXAMPLES, "hf_metrics.py")) as fh:
        source = fh.read()
    tail = source.split("result = registry.compute_all(ctx)\n", 1)[1]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
    batches = [(torch.randn(8, 5), torch.randint(0, 2, (8,))) for _ in range(2)]
    ctx = MetricContext(models=[model], batches=batches, tasks=["task_a", "task_b"],
                        options={"top_fisher_directions": {"k": 3}})
    result = registry.compute_all(ctx)
    exec(compile(tail, "hf_metrics.py (report)", "exec"), {"ctx": ctx, "result": result})
    out = capsys.readouterr().out
    assert "failed " not in out
    (shown,) = re.findall(r"'0': ([0-9.e-]+)", out)
    import natgrad

    exact = natgrad.estimate_fisher(model, batches[0]).layer_totals()["0"]
    assert float(shown) == pytest.approx(round(exact, 4))


def _readme_snippets():
    with open(os.path.join(os.path.dirname(EXAMPLES), "README.md")) as fh:
        return re.findall(r"```python\n(.*?)```", fh.read(), re.S)


def test_readme_snippets_run(tmp_path):
    snippets = _readme_snippets()
    assert len(snippets) >= 7  # the Fisher, each use, metrics
    # One process for all of them (each snippet is self-contained; it runs in tmp_path).
    script = "\n".join(
        f"print('-- snippet {i}', flush=True)\n{code}" for i, code in enumerate(snippets)
    )
    path = tmp_path / "readme_snippets.py"
    path.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(EXAMPLES)}
    proc = subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, cwd=tmp_path, env=env,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert f"-- snippet {len(snippets) - 1}" in proc.stdout


@pytest.mark.slow
def test_hf_trainer(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = run_example("hf_trainer.py", str(tmp_path / "out"), tmp_path=tmp_path)
    assert os.path.exists(tmp_path / "out" / "task_a" / "fisher.safetensors")
    assert len(_floats(r"fisher/trace ([0-9.e+-]+)", out)) == 6  # every 5 of 32 steps
    (acc_b,) = _floats(r"accuracy on B ([0-9.]+)", out)
    assert acc_b > 0.5  # 3 classes: chance is 1/3
