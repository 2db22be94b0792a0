"""natgrad.integrations.lightning under a real ``lightning.Trainer`` on CPU.

A small classifier LightningModule (with dropout, so eval-mode passes matter) is trained
for 1-2 steps. Effects are checked against references written here: the SGD update
against ``-lr (∇CE + λ F (θ - θ*))`` from plain autograd, the saved Fisher against one
backward per sample, the metrics in the CSVLogger's file against per-sample loops on a
snapshot of the weights and the batch of that step.
Skipped when ``lightning`` is not installed (``pip install 'natgrad[integrations]'``).
"""

from __future__ import annotations

import copy
import csv
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from tests.reference import fisher_from_grads, loop_grads

L = pytest.importorskip("lightning")
nl = pytest.importorskip("natgrad.integrations.lightning")

D, C = 5, 3


class Classifier(nl.EWCMixin, L.LightningModule):
    def __init__(self, dropout=0.2, lr=0.1):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Dropout(dropout), nn.Linear(8, C))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _data(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, C, (n,), generator=g)


def _loader(x, y, batch_size=4):
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=False
    )


def _trainer(tmp_path, **kw):
    base = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(tmp_path),
    )
    base.update(kw)
    return L.Trainer(**base)


def _loop_fisher(module, x, y):
    module = copy.deepcopy(module).eval()
    return fisher_from_grads(
        loop_grads(module, lambda out, t: F.cross_entropy(out, t, reduction="sum"), x, y)
    )


# -- EWC -------------------------------------------------------------------------------
@pytest.mark.parametrize("accumulate", [1, 2])
def test_ewc_mixin_gives_the_sgd_step_of_ce_plus_penalty(tmp_path, accumulate):
    """One optimizer step moves θ by -lr (∇CE + λ F (θ0 - θ*)), also when Lightning
    accumulates two micro-batches (the penalty counts once per step)."""
    module = Classifier(dropout=0.0)
    x, y = _data(4)
    names = ["net.0.weight", "net.3.bias"]
    named = dict(module.named_parameters())
    g = torch.Generator().manual_seed(5)
    fisher = {k: torch.rand(named[k].shape, generator=g) for k in names}
    anchor = {k: named[k].detach() + torch.randn(named[k].shape, generator=g) for k in names}
    lam, lr = 2.0, module.lr
    module.ewc = natgrad.EWC(module, fisher, lam=lam, anchor=anchor)
    theta0 = {k: p.detach().clone() for k, p in module.named_parameters()}

    ref = copy.deepcopy(module)
    ce = F.cross_entropy(ref(x), y)  # equal micro-batches: the mean of their means
    grads = dict(zip(theta0, torch.autograd.grad(ce, list(ref.parameters())), strict=True))
    expected = {k: theta0[k] - lr * grads[k] for k in theta0}
    for k in names:
        expected[k] = expected[k] - lr * lam * fisher[k] * (theta0[k] - anchor[k])
    by_hand = sum(0.5 * lam * (fisher[k] * (theta0[k] - anchor[k]) ** 2).sum() for k in names)

    trainer = _trainer(tmp_path, fast_dev_run=accumulate, accumulate_grad_batches=accumulate)
    trainer.fit(module, _loader(x, y, batch_size=4 // accumulate))
    assert trainer.global_step == 1
    torch.testing.assert_close(module.last_penalty, by_hand, rtol=1e-5, atol=1e-6)
    for k, p in module.named_parameters():
        torch.testing.assert_close(p.detach(), expected[k], rtol=1e-5, atol=1e-6, msg=k)
    assert not torch.allclose(expected[names[0]], theta0[names[0]] - lr * grads[names[0]])


def test_ewc_mixin_without_ewc_is_plain_training_and_refuses_other_types(tmp_path):
    module = Classifier(dropout=0.0)
    x, y = _data(4)
    theta0 = {k: p.detach().clone() for k, p in module.named_parameters()}
    ref = copy.deepcopy(module)
    grads = torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters()))
    _trainer(tmp_path, fast_dev_run=1).fit(module, _loader(x, y))
    for (k, p), gk in zip(module.named_parameters(), grads, strict=True):
        torch.testing.assert_close(p.detach(), theta0[k] - module.lr * gk, msg=k)
    module.ewc = {"net.3.bias": torch.ones(C)}
    with pytest.raises(TypeError, match="EWCMixin.ewc must be a natgrad.EWC"):
        _trainer(tmp_path, fast_dev_run=1).fit(module, _loader(x, y))


# -- Fisher at the end of training -------------------------------------------------------
def test_fisher_saved_at_train_end_equals_a_per_sample_loop(tmp_path, caplog):
    module = Classifier(dropout=0.3)
    x, y = _data(8)
    cb = nl.SaveFisherCallback(_loader(x, y))
    with caplog.at_level("INFO", logger="natgrad.integrations"):
        _trainer(tmp_path, fast_dev_run=2, callbacks=[cb]).fit(module, _loader(x, y))
    path = os.path.join(str(tmp_path), "fisher.safetensors")  # no ModelCheckpoint: root dir
    assert cb.path == path and path in caplog.text
    assert module.net[2].training  # the mode is restored after the eval-mode pass
    loaded = natgrad.DiagonalFisher.load(path, module, strict=True)
    assert loaded.n_samples == 8
    direct = natgrad.estimate_fisher(copy.deepcopy(module).eval(), _loader(x, y))
    ref = _loop_fisher(module, x, y)
    for k in ref:
        torch.testing.assert_close(loaded[k], direct[k], rtol=1e-6, atol=1e-9, msg=k)
        torch.testing.assert_close(loaded[k], ref[k], rtol=1e-4, atol=1e-8, msg=k)


def test_fisher_saved_in_the_checkpoint_folder(tmp_path):
    module = Classifier()
    x, y = _data(8)
    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpts")
    cb = nl.SaveFisherCallback((x, y))
    _trainer(tmp_path, max_steps=1, enable_checkpointing=True, callbacks=[ckpt, cb]).fit(
        module, _loader(x, y)
    )
    assert cb.path == os.path.join(str(tmp_path / "ckpts"), "fisher.safetensors")
    assert any(f.endswith(".ckpt") for f in os.listdir(tmp_path / "ckpts"))  # beside it
    assert natgrad.DiagonalFisher.load(cb.path).n_samples == 8


# -- metrics ----------------------------------------------------------------------------
class _Snapshot(L.Callback):
    """The weights and batch of each step, taken after the metrics callback ran."""

    def __init__(self):
        self.steps = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[trainer.global_step] = (copy.deepcopy(pl_module.state_dict()), batch)


def test_metrics_in_the_csv_logger_equal_direct_references(tmp_path):
    module = Classifier(dropout=0.2)
    x, y = _data(8)
    damping = 0.1
    metrics_cb = nl.FisherMetricsCallback(every_n_steps=1, damping=damping)
    snap = _Snapshot()
    logger = L.pytorch.loggers.CSVLogger(str(tmp_path), name="run")
    trainer = _trainer(
        tmp_path, max_steps=2, logger=logger, log_every_n_steps=1, callbacks=[metrics_cb, snap]
    )
    trainer.fit(module, _loader(x, y))
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("fisher/trace")]
    assert [int(r["step"]) for r in rows] == [0, 1]  # logger steps of global steps 1, 2
    for r, step in zip(rows, (1, 2), strict=True):
        state, (bx, by) = snap.steps[step]
        ref_model = Classifier(dropout=0.2)
        ref_model.load_state_dict(state)
        fisher = _loop_fisher(ref_model, bx, by)
        assert float(r["fisher/trace"]) == pytest.approx(
            sum(float(v.sum()) for v in fisher.values()), rel=1e-5
        )
        for mod in ("net.0", "net.3"):
            total = float(fisher[f"{mod}.weight"].sum() + fisher[f"{mod}.bias"].sum())
            assert float(r[f"fisher/layer/{mod}"]) == pytest.approx(total, rel=1e-5)
        ref_model.eval()
        grads = torch.autograd.grad(F.cross_entropy(ref_model(bx), by), list(ref_model.parameters()))
        names = [k for k, _ in ref_model.named_parameters()]
        gn = sum(float((g.double() ** 2).sum()) for g in grads) ** 0.5
        dn = sum(
            float(((g.double() / (fisher[k].double() + damping)) ** 2).sum())
            for k, g in zip(names, grads, strict=True)
        ) ** 0.5
        assert float(r["fisher/grad_norm"]) == pytest.approx(gn, rel=1e-5)
        assert float(r["fisher/natgrad_norm"]) == pytest.approx(dn, rel=1e-5)
        assert float(r["fisher/natgrad_ratio"]) == pytest.approx(dn / gn, rel=1e-5)
    assert float(trainer.callback_metrics["fisher/trace"]) == pytest.approx(
        metrics_cb.last["fisher/trace"], rel=1e-6
    )
    assert module.net[2].training


def test_metrics_on_a_fixed_batch_at_an_interval(tmp_path):
    module = Classifier()
    x, y = _data(8)
    probe = _data(5, seed=9)
    cb = nl.FisherMetricsCallback(probe, every_n_steps=2, metrics=["trace"], prefix="f_")
    snap = _Snapshot()
    _trainer(tmp_path, fast_dev_run=2, callbacks=[cb, snap]).fit(module, _loader(x, y, 2))
    ref_model = Classifier()
    ref_model.load_state_dict(snap.steps[2][0])
    ref = _loop_fisher(ref_model, *probe)
    assert list(cb.last) == ["f_trace"]
    assert cb.last["f_trace"] == pytest.approx(sum(float(v.sum()) for v in ref.values()), rel=1e-5)


def test_callbacks_refuse_bad_options():
    with pytest.raises(ValueError, match="every_n_steps"):
        nl.FisherMetricsCallback(every_n_steps=0)
    with pytest.raises(TypeError, match=r"metrics=\['trace'\]"):
        nl.FisherMetricsCallback(metrics="trace")
    with pytest.raises(ValueError, match="Unknown metrics 'norms'"):
        nl.FisherMetricsCallback(metrics=["norms"])
    with pytest.raises(ValueError, match="metrics is empty"):
        nl.FisherMetricsCallback(metrics=[])
    with pytest.raises(ValueError, match="plain file name"):
        nl.SaveFisherCallback(_data(), filename="a/b.safetensors")


def test_missing_lightning_names_the_pip_command():
    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "try:\n"
        "    import natgrad.integrations.lightning\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert "natgrad.integrations.lightning needs the 'lightning' package" in out.stdout, out.stderr
    assert "pip install 'natgrad[integrations]'" in out.stdout
    assert "pip install lightning" in out.stdout


# -- natural gradient under automatic optimization ----------------------------------------
class NGClassifier(Classifier):
    """configure_optimizers returns natgrad.NaturalGradient; Lightning steps it."""

    def __init__(self, kind, lr=0.1, damping=0.3):
        super().__init__(dropout=0.0, lr=lr)
        self.kind, self.damping = kind, damping

    def configure_optimizers(self):
        pre = natgrad.FisherPreconditioner(
            self, kl_clip=None, kind=self.kind, damping=self.damping, source="backward"
        )
        return natgrad.NaturalGradient(torch.optim.SGD(self.parameters(), lr=self.lr), pre)


def test_natural_gradient_diag_from_backward_under_automatic_optimization(tmp_path):
    """One step moves θ by -lr g / (F + λ), F = (1/N) Σ_n g_n² from one backward per sample."""
    module = NGClassifier("diag")
    x, y = _data(6)
    theta0 = {k: p.detach().clone() for k, p in module.named_parameters()}
    ref = copy.deepcopy(module)
    g = dict(zip(theta0, torch.autograd.grad(F.cross_entropy(ref(x), y), list(ref.parameters())), strict=True))
    fisher = _loop_fisher(ref, x, y)
    _trainer(tmp_path, fast_dev_run=1).fit(module, _loader(x, y, 6))
    for k, p in module.named_parameters():
        expected = theta0[k] - module.lr * g[k] / (fisher[k] + module.damping)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("kind", ["kfac", "ekfac", "lowrank"])
def test_natural_gradient_from_backward_equals_the_batch_source(tmp_path, kind):
    """K-FAC, EKFAC and low rank from the records of Lightning's own forward/backward give
    the same step as natgrad's separate pass on the same batch (empirical labels; each
    batch-source kind is checked against dense references in tests/optim)."""
    module = NGClassifier(kind)
    x, y = _data(6)
    ref = copy.deepcopy(module)
    pre = natgrad.FisherPreconditioner(ref, kl_clip=None, kind=kind, damping=ref.damping, source="batch")
    F.cross_entropy(ref(x), y).backward()
    pre.step((x, y))
    with torch.no_grad():
        for p in ref.parameters():
            p -= ref.lr * p.grad
    _trainer(tmp_path, fast_dev_run=1).fit(module, _loader(x, y, 6))
    moved = False
    for (k, p), q in zip(module.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6, msg=k)
        moved |= not torch.equal(p.detach(), dict(NGClassifier(kind).named_parameters())[k].detach())
    assert moved


class NGPartsClassifier(NGClassifier):
    """A training_step that calls the module's part (``self.net``), not the module."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self.net(x), y)


@pytest.mark.parametrize("kind", ["kfac", "diag"])
def test_natural_gradient_from_backward_with_accumulation_when_the_step_calls_a_part(
    tmp_path, kind
):
    """accumulate_grad_batches=2 with a training_step calling ``self.net(x)``: the two
    micro-batches are two forwards of 3 samples, the step the 6-sample batch source's
    (they were pooled as positions of 3 samples, the curvature silently off)."""
    module = NGPartsClassifier(kind)
    x, y = _data(6)
    ref = copy.deepcopy(module)
    pre = natgrad.FisherPreconditioner(ref, kl_clip=None, kind=kind, damping=ref.damping,
                                       source="batch")
    F.cross_entropy(ref(x), y).backward()
    pre.step((x, y))
    with torch.no_grad():
        for p in ref.parameters():
            p -= ref.lr * p.grad
    _trainer(tmp_path, fast_dev_run=2, accumulate_grad_batches=2).fit(module, _loader(x, y, 3))
    for (k, p), q in zip(module.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("kind", ["ekfac", "diag"])
def test_natural_gradient_callback_with_batch_source(tmp_path, kind):
    """The callback's step equals a hand-run `loss.backward(); pre.step(batch); SGD` on a
    copy, with the batch source (EKFAC needs it); the module's modes are restored."""
    module = Classifier(dropout=0.0)
    x, y = _data(6)
    ref = copy.deepcopy(module)
    ref_pre = natgrad.FisherPreconditioner(ref, kl_clip=None, kind=kind, damping=0.3, labels="exact")
    F.cross_entropy(ref(x), y).backward()
    ref.eval()
    ref_pre.step((x, y))
    with torch.no_grad():
        for p in ref.parameters():
            p -= ref.lr * p.grad
    pre = natgrad.FisherPreconditioner(module, kl_clip=None, kind=kind, damping=0.3, labels="exact")
    cb = nl.NaturalGradientCallback(pre)
    _trainer(tmp_path, fast_dev_run=1, callbacks=[cb]).fit(module, _loader(x, y, 6))
    assert cb.last.preconditioned and cb.last.curvature_updated
    assert module.net[2].training
    for (k, p), q in zip(module.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6, msg=k)
    with pytest.raises(TypeError, match="natgrad.FisherPreconditioner"):
        nl.NaturalGradientCallback(torch.optim.SGD(module.parameters(), lr=0.1))


class TwoGroupClassifier(Classifier):
    """Two SGD groups with different learning rates."""

    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.net[0].parameters(), "lr": 0.5},
                                {"params": self.net[3].parameters(), "lr": 0.05}], lr=0.1)


def test_natural_gradient_callback_clips_with_each_groups_lr(tmp_path):
    """With two SGD groups and an active kl_clip, the callback's step equals a hand-run
    `pre.step(batch, lr={name: group lr})` + per-group SGD on a copy (it used group 0's lr
    for every parameter)."""
    module = TwoGroupClassifier(dropout=0.0)
    x, y = _data(6)
    ref = copy.deepcopy(module)
    lrs = {k: (0.5 if k.startswith("net.0.") else 0.05) for k, _ in ref.named_parameters()}
    ref_pre = natgrad.FisherPreconditioner(ref, kind="diag", damping=0.3, kl_clip=1e-4)
    F.cross_entropy(ref(x), y).backward()
    ref.eval()
    ref_pre.step((x, y), lr=lrs)
    with torch.no_grad():
        for k, p in ref.named_parameters():
            p -= lrs[k] * p.grad
    pre = natgrad.FisherPreconditioner(module, kind="diag", damping=0.3, kl_clip=1e-4)
    cb = nl.NaturalGradientCallback(pre)
    _trainer(tmp_path, fast_dev_run=1, callbacks=[cb]).fit(module, _loader(x, y, 6))
    assert cb.last.kl_scale < 1.0  # the clip is active, so the lrs matter
    for (k, p), q in zip(module.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-4, atol=1e-6, msg=k)


def _resumed_equals_uninterrupted(tmp_path, make_module, make_callbacks, steps=4, at=2):
    """Train `steps` steps in one run (checkpoint every `at` steps), then resume a fresh
    module from the step-`at` checkpoint: both must end with identical parameters."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y = _data(8)
    module = make_module()
    ckdir = tmp_path / "ck"
    _trainer(tmp_path, max_steps=steps, enable_checkpointing=True, callbacks=[
        *make_callbacks(module),
        ModelCheckpoint(dirpath=str(ckdir), every_n_train_steps=at, save_top_k=-1),
    ]).fit(module, _loader(x, y, 4))
    resumed = make_module()
    callbacks = make_callbacks(resumed)
    _trainer(tmp_path, max_steps=steps, callbacks=callbacks).fit(
        resumed, _loader(x, y, 4), ckpt_path=str(ckdir / f"epoch=0-step={at}.ckpt"))
    for (k, p), q in zip(module.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p.detach(), q.detach()), k
    return callbacks


def test_natural_gradient_callback_resumes_its_preconditioner_from_a_checkpoint(tmp_path):
    """The callback's preconditioner (step count, EMA'd K-FAC factors, `mc` generator) is
    saved in Lightning's checkpoint and restored on resume: the resumed run equals the
    uninterrupted one bit for bit (it restarted the schedule at step 0 with no curvature:
    parameters off by ~0.1 after 3 more steps)."""
    def callbacks(module):
        return [nl.NaturalGradientCallback(natgrad.FisherPreconditioner(
            module, kind="kfac", labels="mc", damping=0.1, update_every=2, ema_decay=0.5,
            kl_clip=1e-2))]

    (cb,) = _resumed_equals_uninterrupted(tmp_path, lambda: Classifier(dropout=0.0), callbacks)
    assert cb.preconditioner.state_dict()["step"] == 4


def test_natural_gradient_optimizer_resumes_from_a_checkpoint(tmp_path):
    """NaturalGradient from configure_optimizers: its state (optimizer + preconditioner)
    goes through Lightning's optimizer_states and the resumed run equals the uninterrupted
    one."""
    _resumed_equals_uninterrupted(tmp_path, lambda: NGClassifier("kfac"), lambda m: [])


def test_metrics_callback_leaves_the_backward_source_curvature_alone(tmp_path):
    """FisherMetricsCallback's own Fisher pass, run every step between the steps' records,
    is not recorded by a source="backward" preconditioner refreshed every step: training
    with it equals training without it (docs/integrations.md said to avoid the pair)."""
    class EveryStep(NGClassifier):
        def configure_optimizers(self):
            pre = natgrad.FisherPreconditioner(self, kind="kfac", source="backward",
                                               damping=0.3, update_every=1, kl_clip=None)
            return natgrad.NaturalGradient(torch.optim.SGD(self.parameters(), lr=self.lr), pre)

    x, y = _data(8)
    runs = []
    for callbacks in ([], [nl.FisherMetricsCallback(every_n_steps=1)]):
        module = EveryStep("kfac")
        _trainer(tmp_path, max_steps=2, callbacks=callbacks).fit(module, _loader(x, y, 4))
        runs.append([p.detach().clone() for p in module.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_two_natural_gradient_callbacks_share_a_trainer_and_resume(tmp_path):
    """One preconditioner for the first layer, one for the last: their states are keyed by
    their parameters (both were keyed 'NaturalGradientCallback', which Lightning refuses
    for two stateful callbacks), and the resumed run equals the uninterrupted one."""
    def callbacks(module):
        return [
            nl.NaturalGradientCallback(natgrad.FisherPreconditioner(
                module, kind="diag", damping=0.1, update_every=1, params=[module.net[0]])),
            nl.NaturalGradientCallback(natgrad.FisherPreconditioner(
                module, kind="kfac", labels="mc", damping=0.1, update_every=2,
                params=[module.net[3]])),
        ]

    cbs = _resumed_equals_uninterrupted(tmp_path, lambda: Classifier(dropout=0.0), callbacks)
    assert [cb.preconditioner.state_dict()["step"] for cb in cbs] == [4, 4]


def test_resuming_a_checkpoint_without_the_callbacks_state_warns(tmp_path):
    """A checkpoint written without the callback resumes its preconditioner from scratch
    (Lightning calls load_state_dict only when the key exists): a warning says so."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    x, y = _data(8)
    ckdir = tmp_path / "ck"
    _trainer(tmp_path, max_steps=2, enable_checkpointing=True, callbacks=[
        ModelCheckpoint(dirpath=str(ckdir), every_n_train_steps=2, save_top_k=-1),
    ]).fit(Classifier(dropout=0.0), _loader(x, y, 4))
    module = Classifier(dropout=0.0)
    cb = nl.NaturalGradientCallback(natgrad.FisherPreconditioner(module, kind="diag"))
    with pytest.warns(UserWarning, match="holds no state of this callback.*afresh"):
        _trainer(tmp_path, max_steps=3, callbacks=[cb]).fit(
            module, _loader(x, y, 4), ckpt_path=str(ckdir / "epoch=0-step=2.ckpt"))


class TwoOptimizerClassifier(Classifier):
    """Manual optimization with one backward, then one optimizer per layer."""

    def __init__(self):
        super().__init__(dropout=0.0)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        o1, o2 = self.optimizers()
        x, y = batch
        o1.zero_grad()
        o2.zero_grad()
        self.manual_backward(F.cross_entropy(self(x), y))
        o1.step()
        o2.step()

    def configure_optimizers(self):
        return [torch.optim.SGD(self.net[0].parameters(), lr=0.1),
                torch.optim.SGD(self.net[3].parameters(), lr=0.05)]


def test_natural_gradient_callback_preconditions_once_for_several_optimizers(tmp_path):
    """Two optimizers stepped after one backward: the callback preconditioned the
    gradients once per optimizer ((F + λI)⁻² g for the second, and the step count twice;
    found by review). Reference: one pre.step per backward by hand, then both steps."""
    x, y = _data(12)
    module = TwoOptimizerClassifier()
    ref = copy.deepcopy(module)
    pre = natgrad.FisherPreconditioner(module, kind="kfac", damping=0.1, update_every=2,
                                       kl_clip=None)
    _trainer(tmp_path, max_epochs=1, callbacks=[nl.NaturalGradientCallback(pre)]).fit(
        module, _loader(x, y, 4))
    ref_pre = natgrad.FisherPreconditioner(ref, kind="kfac", damping=0.1, update_every=2,
                                           kl_clip=None)
    o1, o2 = ref.configure_optimizers()
    for xb, yb in _loader(x, y, 4):
        o1.zero_grad()
        o2.zero_grad()
        F.cross_entropy(ref(xb), yb).backward()
        ref.eval()
        ref_pre.step((xb, yb))
        ref.train()
        o1.step()
        o2.step()
    assert pre.state_dict()["step"] == ref_pre.state_dict()["step"] == 3
    for (k, p), q in zip(module.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-8, msg=k)
