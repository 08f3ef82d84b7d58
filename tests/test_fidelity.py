"""Issue 14: faithful to CAP where the paper builds on it, the abstract's readings switchable, one place per part.

1. CAP's guided-filter prior, against an independent transcription of CAP's formula on real CT.
2. CAP's stateful AdamW proxy (moments across batches, the model's initial lr), its state in last.pt.
3. ``cap`` backpropagates through the soft target in every preset; the stop-gradient is a named ablation.
4. The two readings of the abstract as switches (weight-level feedback, training on the prior view), off.
5. A registry per part: CHOICES and the methods table come from them; a loss registered here trains.
6. Helpers: selected checkpoints, random directions, ``applied``, and the small ``common`` module.
"""

from __future__ import annotations

import ast
import copy
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from robustmed_lite import common
from robustmed_lite.book.runs import load_selected, train_or_load
from robustmed_lite.checkpoints import config_differences, load_checkpoint
from robustmed_lite.cli import main
from robustmed_lite.components import (
    ATTACKS,
    FEEDBACK,
    LOSSES,
    METHOD_REGISTRY,
    PRIOR_VIEWS,
    WEIGHT_NOISE,
    Batch,
    register_feedback,
    register_loss,
    register_method,
    register_prior_view,
)
from robustmed_lite.config import (
    ADDED_FIELDS,
    CHOICES,
    METHOD_FIELDS,
    METHODS,
    PAPER_ADDITIONS,
    PRESETS,
    load_config,
    methods_table,
    paper_additions_table,
)
from robustmed_lite.data import loaders as data_module
from robustmed_lite.data.dataset import PriorDataset
from robustmed_lite.data.loaders import load_images
from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.data.splits import build_data
from robustmed_lite.evaluation import attacks
from robustmed_lite.evaluation import metrics as evaluate_module
from robustmed_lite.method.feedback_attack import FeedbackPGD, FeedbackRule
from robustmed_lite.method.objectives import trades_loss
from robustmed_lite.method.prior import _cap_box_torch, cap_guided_filter, cap_window, lung_prior
from robustmed_lite.method.weight_perturbation import (
    WeightPerturbation,
    perturbed_names,
    random_direction,
    relative_diff,
)
from robustmed_lite.models import create_model
from robustmed_lite.studies.fidelity import FORMER
from robustmed_lite.trainer import Trainer

SMALL = dict(
    img_size=32,
    n_train=64,
    n_val=32,
    n_test=32,
    batch_size=32,
    epochs=2,
    eval_n=16,
    attack_steps=2,
    eval_attack_steps=2,
    progress=False,
    eps="8/255",
    step_size="2/255",
    gamma=0.01,
)
TINY_CLI = [
    "--img_size",
    "32",
    "--n_train",
    "64",
    "--n_val",
    "32",
    "--n_test",
    "32",
    "--batch_size",
    "32",
    "--eval_n",
    "16",
    "--attack_steps",
    "2",
    "--eval_attack_steps",
    "2",
    "--progress",
    "false",
    "--epochs",
    "1",
]


def _config(tmp_path, **overrides):
    return load_config("cpu-demo", dict(out_dir=str(tmp_path / "run"), **overrides), defaults=SMALL)


@pytest.fixture(scope="module")
def small_data():
    return build_data(load_config("cpu-demo", dict(method="robustmed"), defaults=SMALL))


def _preset_overrides(preset: str, tmp_path) -> dict:
    # The paper preset refuses to run without data: any existing folder passes the check (nothing is loaded).
    return {"data": str(tmp_path)} if preset == "paper" else {}


# ------------------------------------------------------------------------------------ 1. CAP's prior view
def cap_prior_restated(G: np.ndarray) -> np.ndarray:
    """CAP's prior of one 8-bit slice, transcribed from its code (the facts in the issue), in float64:

    bright B = G where G > 127 (else 0); dark D = G where G <= 127 (else 0); guide I = G / 255, input p = D / 255;
    both down-sampled to half size with cv2.INTER_CUBIC; box = cv2.blur with ksize round(5 * 0.5) = 2 and its
    defaults (anchor at the centre, i.e. offsets -1 and 0; BORDER_DEFAULT = BORDER_REFLECT_101);
    a = cov(I, p) / (var(I) + 0.003), b = mean(p) - a mean(I); blur a and b; up-sample with cv2.INTER_LINEAR;
    q = mean_a * I + mean_b at full resolution; x_aug = B / 255 + q over the whole image. CAP then rounds q * 255
    to uint8 (negative values wrap) and saturates the sum at 255; the package clips to [0, 1] instead, so this
    transcription clips (and does not round: the comparison is of the formula, before 8-bit storage).
    """
    bright = np.where(G > 127, G, 0).astype(np.float64)
    dark = np.where(G <= 127, G, 0).astype(np.float64)
    guide, inp = G.astype(np.float64) / 255, dark / 255
    h, w = G.shape
    r = round(5 * 0.5)
    small = (w // 2, h // 2)
    guide_s = cv2.resize(guide, small, interpolation=cv2.INTER_CUBIC)
    inp_s = cv2.resize(inp, small, interpolation=cv2.INTER_CUBIC)

    def box(a):
        return cv2.blur(a, (r, r))

    mean_i, mean_p = box(guide_s), box(inp_s)
    cov = box(guide_s * inp_s) - mean_i * mean_p
    var = box(guide_s * guide_s) - mean_i * mean_i
    a = cov / (var + 0.003)
    b = mean_p - a * mean_i
    mean_a = cv2.resize(box(a), (w, h), interpolation=cv2.INTER_LINEAR)
    mean_b = cv2.resize(box(b), (w, h), interpolation=cv2.INTER_LINEAR)
    q = mean_a * guide + mean_b
    return np.clip(bright / 255 + q, 0, 1)


@pytest.fixture(scope="module")
def soares_8bit(shared_data, tmp_path_factory):
    """Five Soares slices at CAP's 224 px, on the 8-bit grid CAP's G lives on."""
    images = load_images(
        shared_data / "sarscov2", 224, cache_dir=tmp_path_factory.mktemp("cache"), progress=False
    ).images[torch.tensor([0, 1, 700, 1500, 2400])]
    return np.round(images[:, 0].numpy() * 255).astype(np.uint8)


@pytest.mark.parametrize("backend", ["opencv", "torch"])
def test_cap_prior_matches_a_restatement_of_caps_formula_on_real_ct(soares_8bit, backend):
    x = torch.from_numpy(soares_8bit.astype(np.float32) / 255)[:, None]
    x_aug = lung_prior(x, with_mask=False, backend=backend)[0]  # the default view is CAP's
    for i, G in enumerate(soares_8bit):
        assert np.abs(x_aug[i, 0].double().numpy() - cap_prior_restated(G)).max() <= 1e-4
    # The earlier variant (3x3 box, bilinear, dark region only) is measurably another function.
    package = lung_prior(x, with_mask=False, view="package")[0]
    assert (package - x_aug).abs().amax(dim=(1, 2, 3)).min() > 0.05


def test_caps_window_is_a_2x2_box_at_half_resolution():
    assert cap_window(2, 0.5) == 2 and cap_window(2, 1.0) == 5 and cap_window(4, 0.5) == 4  # round(4.5) = 4
    # cv2.blur's 2x2 box averages offsets -1 and 0: a single bright pixel at (2, 2) reaches (2..3, 2..3).
    x = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    x[0, 0, 2, 2] = 1.0
    boxed = _cap_box_torch(x, 2)[0, 0]
    assert torch.equal(boxed.nonzero(), torch.tensor([[2, 2], [2, 3], [3, 2], [3, 3]]))
    assert torch.allclose(boxed, torch.from_numpy(cv2.blur(x[0, 0].numpy(), (2, 2))))
    # Borders mirror without repeating the edge pixel (BORDER_REFLECT_101): row -1 is row 1.
    edge = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    edge[0, 0, 1, :] = 1.0
    assert torch.allclose(_cap_box_torch(edge, 2)[0, 0, 0], torch.full((4,), 0.5, dtype=torch.float64))
    # With huge eps, q = box(box(p)) at half resolution, resampled: a constant p stays constant.
    flat = torch.full((1, 1, 16, 16), 0.3, dtype=torch.float64)
    assert torch.allclose(cap_guided_filter(flat, flat, eps=1e9), flat)


def test_cap_view_is_differentiable_with_the_torch_backend():
    gen = torch.Generator().manual_seed(0)
    I = torch.rand(1, 1, 12, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    p = torch.rand(1, 1, 12, 10, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cap_guided_filter(a, b, 2, 0.01), (I, p))


@pytest.mark.parametrize("preset", PRESETS)
def test_cap_and_robustmed_use_caps_view_and_the_package_view_stays_an_option(preset, tmp_path):
    extra = _preset_overrides(preset, tmp_path)
    for method in ("cap", "robustmed"):
        assert load_config(preset, {"method": method, **extra}).prior_view == "cap"
        assert load_config(preset, {"method": method, "prior_view": "package", **extra}).prior_view == "package"
    with pytest.raises(ValueError, match="prior_view"):
        load_config("cpu-demo", {"method": "cap", "prior_view": "fancy"})


@pytest.mark.parametrize("view", ["cap", "package"])
def test_the_training_data_holds_the_configured_view(view):
    cfg = load_config("cpu-demo", dict(method="cap", prior_view=view, hflip=False), defaults=SMALL)
    splits = build_data(cfg)
    x, x_aug, _ = next(splits.train.batches(16, epoch=0, shuffle=False))[:3]
    assert torch.allclose(x_aug, lung_prior(x, with_mask=False, view=view)[0], atol=1e-6)


# ------------------------------------------------------------------------------------ 2. the proxy optimiser
def _two_batches():
    data = make_phantom_dataset(32, 32, seed=0)
    return (data.images[:16], data.images[:16].flip(-1), data.labels[:16]), (
        data.images[16:],
        data.images[16:].flip(-1),
        data.labels[16:],
    )


def test_adamw_proxy_keeps_its_moments_across_batches_and_sgd_keeps_none():
    torch.manual_seed(0)
    model = create_model("tiny_visformer", img_size=32)
    first, second = _two_batches()
    stateful = WeightPerturbation(model, "proxy_attention", gamma=0.01, beta=3.0, proxy_lr=1e-3, optimizer="adamw")
    stateful.compute(*first)
    d_running = stateful.compute(*second)
    state = stateful.proxy_optim.state_dict()["state"]
    assert state and all(int(s["step"]) == 2 for s in state.values())
    fresh = WeightPerturbation(model, "proxy_attention", gamma=0.01, beta=3.0, proxy_lr=1e-3, optimizer="adamw")
    d_fresh = fresh.compute(*second)
    assert any(not torch.allclose(d_running[n], d_fresh[n]) for n in d_running), "the moments carry history"
    sgd = WeightPerturbation(model, "proxy_attention", gamma=0.01, beta=3.0, optimizer="sgd")
    sgd.compute(*first)
    assert not sgd.proxy_optim.state


def test_adamw_over_the_perturbed_weights_gives_caps_noise_of_adamw_over_all_weights():
    """CAP steps AdamW over every proxy parameter; Adam is elementwise and the noise reads the perturbed weights
    only, so stepping those alone (cheaper backward pass) gives the same noise, batch after batch."""
    torch.manual_seed(0)
    model = create_model("tiny_visformer", img_size=32)
    noise = WeightPerturbation(model, "proxy_attention", gamma=0.01, beta=3.0, proxy_lr=5e-4, optimizer="adamw")
    reference = WeightPerturbation(model, "proxy_attention", gamma=0.01, beta=3.0)
    reference.proxy = copy.deepcopy(model)  # CAP: every parameter takes a gradient and an AdamW step
    reference.proxy_optim = torch.optim.AdamW(reference.proxy.parameters(), lr=5e-4, weight_decay=1e-4)
    for x, x_aug, y in _two_batches():
        ours = noise.compute(x, x_aug, y)
        reference.proxy.load_state_dict(model.state_dict())
        reference.proxy.train()
        loss = reference.proxy_loss(x, x_aug, y)
        reference.proxy_optim.zero_grad()
        loss.backward()
        reference.proxy_optim.step()
        caps = relative_diff(model, reference.proxy, noise.names)
        for name in noise.names:
            assert torch.allclose(ours[name], caps[name], rtol=1e-5, atol=1e-7), name


def test_proxy_lr_is_the_models_initial_lr_and_is_not_scheduled(tmp_path, small_data):
    cfg = _config(tmp_path, method="cap", weight_noise_warmup=0, lr=3e-3)
    assert cfg.proxy_optimizer == "adamw" and cfg.proxy_lr == 3e-3 and cfg.proxy_weight_decay == 1e-4
    assert load_config("cpu-demo", {"method": "awp"}).proxy_optimizer == "sgd"
    trainer = Trainer(cfg, data=small_data)
    trainer.fit()
    assert trainer.optimizer.param_groups[0]["lr"] < 1e-6  # the model's cosine reached the bottom
    group = trainer.weight_noise.proxy_optim.param_groups[0]
    assert isinstance(trainer.weight_noise.proxy_optim, torch.optim.AdamW)
    assert group["lr"] == 3e-3 and group["weight_decay"] == 1e-4


@pytest.mark.parametrize("method", ["cap", "robustmed"])
def test_proxy_state_is_in_last_pt_and_resume_needs_it(method, tmp_path, small_data):
    """With the noise on from epoch 2, a run split after epoch 2 resumes bitwise (test_trainer checks it); here:
    last.pt holds AdamW's moments, and a resume that drops them trains to other weights."""

    def cfg(where):
        return _config(tmp_path / where, method=method, epochs=3, weight_noise_warmup=2)

    full = Trainer(cfg("full"), data=small_data)
    full.fit()
    Trainer(cfg("split"), data=small_data).fit(stop_after=2)
    state = load_checkpoint(tmp_path / "split" / "run" / "last.pt", required=("weight_noise",))["weight_noise"]
    assert state["optimizer"] == "adamw" and state["proxy_optim"]["state"]
    assert all("exp_avg" in s for s in state["proxy_optim"]["state"].values())
    forgetful = Trainer(cfg("split"), data=small_data, resume=True)
    forgetful.weight_noise.proxy_optim.state.clear()  # as if last.pt had not kept the proxy's moments
    forgetful.fit()
    assert any(
        not torch.equal(a, b) for a, b in zip(full.model.state_dict().values(), forgetful.model.state_dict().values())
    )


# ------------------------------------------------------------------------------- 3. the soft-target gradient
@pytest.mark.parametrize("preset", PRESETS)
def test_cap_backpropagates_through_the_soft_target_in_every_preset(preset, tmp_path):
    extra = _preset_overrides(preset, tmp_path)
    for method in ("cap", "robustmed"):
        assert load_config(preset, {"method": method, **extra}).target_grad is True
        assert load_config(preset, {"method": method, "target_grad": "false", **extra}).target_grad is False
    assert load_config(preset, {"method": "trades", **extra}).target_grad is False


@pytest.mark.parametrize("target_grad", [True, False])
def test_the_gradient_reaches_the_prior_view_only_with_target_grad(target_grad):
    torch.manual_seed(0)
    model = create_model("small_cnn", img_size=32)
    data = make_phantom_dataset(8, 32, seed=1)
    x_aug = data.images.flip(-1).clone().requires_grad_(True)
    cfg = load_config("cpu-demo", {"method": "cap", "target_grad": target_grad})
    batch = Batch(data.images, data.images.clamp(0.01, 0.99), x_aug, data.labels)
    LOSSES["square_kl"](model.train(), batch, cfg).backward()
    assert (x_aug.grad is not None and x_aug.grad.abs().sum() > 0) == target_grad


# ------------------------------------------------------------------------ 4. the two readings of the abstract
def test_the_readings_are_switches_that_default_off_and_are_documented():
    for method in ("cap", "robustmed"):
        cfg = load_config("cpu-demo", {"method": method})
        assert cfg.weight_feedback is False and cfg.prior_samples == 0.0
    assert {"weight_feedback", "prior_samples"} <= set(PAPER_ADDITIONS)
    assert all("interpretation" in PAPER_ADDITIONS[k][1] for k in ("weight_feedback", "prior_samples"))
    with pytest.raises(ValueError, match="weight_feedback"):
        load_config("cpu-demo", {"method": "trades", "weight_feedback": True})
    with pytest.raises(ValueError, match="prior_samples"):
        load_config("cpu-demo", {"method": "trades", "prior_samples": 0.5})
    with pytest.raises(ValueError, match="prior_samples"):
        load_config("cpu-demo", {"method": "cap", "prior_samples": 1.5})


@pytest.mark.parametrize("share,expected", [(0.0, 1 / 8), (1.0, 1.0)])
def test_weight_feedback_halves_gamma_while_the_perturbed_model_errs(share, expected, tmp_path, small_data):
    trainer = Trainer(
        _config(
            tmp_path,
            method="robustmed",
            weight_noise_warmup=0,
            weight_feedback=True,
            weight_feedback_share=share,
            weight_feedback_halvings=3,
            lr=0.0,
            weight_decay=0.0,
        ),
        data=small_data,
    )
    noise = trainer.weight_noise
    used = []
    perturb = noise.perturb
    noise.perturb = lambda d, gamma=None: (used.append(gamma), perturb(d, gamma))[-1]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    x, x_aug, y = next(trainer.data.train.batches(32, epoch=0))[:3]
    stats = trainer.train_step(x, x_aug, y, epoch=0, attack=trainer.sample_attack(0))
    # share 0: any error at all halves gamma, three times; share 1: never
    assert stats["gamma_scale"] == expected and used[-1] == pytest.approx(0.01 * expected)
    assert used == [0.01 * 0.5**k for k in range(len(used))]
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters()), "restored bitwise"


def test_prior_samples_join_the_batch_as_labelled_training_samples(tmp_path, small_data):
    seen = []

    @register_loss("_capture", needs_attack=True)
    def capture(model, batch, cfg):
        seen.append(batch)
        return LOSSES["square_kl"](model, batch, cfg)

    try:
        trainer = Trainer(_config(tmp_path, method="cap", loss="_capture", prior_samples=0.5), data=small_data)
        x, x_aug, y = next(trainer.data.train.batches(32, epoch=0))[:3]
        stats = trainer.train_step(x, x_aug, y, epoch=0, attack=trainer.sample_attack(0), batch_index=3)
        trainer.train_step(x, x_aug, y, epoch=0, attack=trainer.sample_attack(0), batch_index=3)
    finally:
        LOSSES.unregister("_capture")
    batch = seen[0]
    assert stats["prior_samples"] == 0.5 and len(batch.x) == 48 and len(batch.x_adv) == 48
    assert torch.equal(batch.x[:32], x) and torch.equal(batch.y[:32], y)
    extra = batch.x[32:]
    pick = [next(i for i in range(32) if torch.equal(x_aug[i], e)) for e in extra]  # each extra is a prior view
    assert torch.equal(batch.y[32:], y[pick]) and torch.equal(batch.x_aug[32:], extra)
    assert torch.equal(seen[1].x, batch.x), "the same draw for the same (seed, epoch, batch)"


# --------------------------------------------------------------------------------------- 5. the registries
def test_choices_and_the_methods_table_are_read_from_the_registries():
    for key, registry in (
        ("attack", ATTACKS),
        ("feedback", FEEDBACK),
        ("weight_noise", WEIGHT_NOISE),
        ("loss", LOSSES),
        ("prior_view", PRIOR_VIEWS),
    ):
        assert CHOICES[key] == registry.names() and len(registry.names()) >= 2
    assert set(CHOICES["loss"]) >= {"ce", "trades", "mart", "score", "square_kl"}
    table = methods_table()
    assert list(table["method"]) == list(METHODS) == list(METHOD_REGISTRY)
    assert set(METHOD_FIELDS) <= set(table.columns)
    with pytest.raises(ValueError, match="already registered"):
        register_loss("trades", lambda model, batch, cfg: None)


@pytest.fixture
def my_defence():
    """A new defence registered in one place, as a notebook cell would: a loss and a method that uses it."""
    calls = []

    @register_loss("my_loss", needs_attack=True, description="TRADES with a margin on the prior view")
    def my_loss(model, batch, cfg):
        calls.append(len(batch.y))
        logits = model(batch.x).float()
        return (
            trades_loss(logits, model(batch.x_adv).float(), batch.y, cfg.beta)
            + 0.1 * F.relu(1 - model(batch.x_aug).float().gather(1, batch.y[:, None])).mean()
        )

    register_method("my_defence", attack="trades", loss="my_loss", prior=True, prior_view="package")
    yield calls
    LOSSES.unregister("my_loss")
    METHOD_REGISTRY.unregister("my_defence")


def test_a_loss_registered_in_a_test_trains_with_the_trainer_and_the_cli(my_defence, tmp_path, capsys, small_data):
    assert "my_loss" in CHOICES["loss"] and "my_defence" in METHODS
    history = Trainer(_config(tmp_path / "a", method="trades", loss="my_loss", epochs=1), data=small_data).fit()
    assert my_defence and len(history) == 1
    calls = len(my_defence)
    assert (
        main(["train", "--method", "trades", "--loss", "my_loss", "--out_dir", str(tmp_path / "cli"), *TINY_CLI]) == 0
    )
    assert len(my_defence) > calls
    assert yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())["loss"] == "my_loss"
    # The registered method too, from the command line; its fields come from its row.
    assert main(["train", "--method", "my_defence", "--out_dir", str(tmp_path / "method"), *TINY_CLI]) == 0
    saved = yaml.safe_load((tmp_path / "method" / "config.yaml").read_text())
    assert (saved["loss"], saved["prior"], saved["prior_view"], saved["weight_noise"]) == (
        "my_loss",
        True,
        "package",
        "none",
    )
    capsys.readouterr()
    assert main(["train", "--method", "trades", "--loss", "nope", "--out_dir", str(tmp_path / "bad"), *TINY_CLI]) == 2
    assert "my_loss" in capsys.readouterr().err  # the choices listed in the error come from the registry


def test_a_registered_feedback_rule_and_prior_view_are_used():
    class FirstStep(FeedbackRule):
        """Stops every sample after its first gradient step."""

        def observe(self, t, wrong, x_rows, rows):
            self.steps_taken[rows] = t
            return torch.full_like(wrong, t >= 1)

    register_feedback("first_step", FirstStep)
    register_prior_view("identity", lambda x, dark, radius, eps, s, backend: x.clone(), flip_equivariant=True)
    try:
        assert "first_step" in CHOICES["feedback"] and "identity" in CHOICES["prior_view"]
        torch.manual_seed(0)
        model = create_model("small_cnn", img_size=32).eval()
        data = make_phantom_dataset(8, 32, seed=2)
        attack = FeedbackPGD(8 / 255, steps=5, rule="first_step", seed=0)
        x_adv = attack(model, data.images, data.labels)
        # one step of 2/255 from the start x + 0.001 N(0, 1)
        assert (attack.last_steps == 1).all() and (x_adv - data.images).abs().max() <= 2 / 255 + 0.006
        cfg = load_config(
            "cpu-demo", dict(method="robustmed", feedback="first_step", prior_view="identity"), defaults=SMALL
        )
        assert isinstance(Trainer.sample_attack(type("T", (), {"cfg": cfg})(), 0), FeedbackPGD)
        ds = PriorDataset(data.images, data.labels, prior_kwargs={"view": "identity"})
        assert torch.equal(ds.x_aug, data.images)
    finally:
        FEEDBACK.unregister("first_step")
        PRIOR_VIEWS.unregister("identity")


@pytest.mark.parametrize("preset", PRESETS)
def test_robustmed_differs_from_cap_only_by_the_papers_additions(preset, tmp_path):
    extra = _preset_overrides(preset, tmp_path)
    cap = load_config(preset, {"method": "cap", **extra}).to_dict()
    robustmed = load_config(preset, {"method": "robustmed", **extra}).to_dict()
    differ = {k for k in cap if cap[k] != robustmed[k]}
    assert differ - {"method"} <= set(PAPER_ADDITIONS), differ
    assert "feedback" in differ  # the one addition that is on by default
    table = paper_additions_table()
    assert list(table.columns[:3]) == ["awp", "cap", "robustmed"]
    shown = table[table["cap"] != table["robustmed"]].index
    assert set(shown) <= set(PAPER_ADDITIONS) and all(table.loc[k, "paper's addition to CAP"] for k in PAPER_ADDITIONS)


# ---------------------------------------------------------------------------------------------- 6. helpers
def test_the_small_helpers_live_in_common_and_the_old_paths_still_work():
    assert attacks.eval_mode is common.eval_mode and attacks.parse_eps is common.parse_eps
    assert attacks.format_eps is common.format_eps and evaluate_module.model_device is common.model_device
    assert data_module.CLASS_NAMES is common.CLASS_NAMES == ("non-COVID", "COVID")
    tree = ast.parse(Path(common.__file__).read_text())
    relative = [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level > 0]
    assert not relative, "common imports nothing from the package: everything imports it downward"
    assert common.parse_eps("8/255") == pytest.approx(8 / 255) and common.format_eps(0.03) == "7.65/255"


def test_random_direction_has_the_given_per_layer_sizes():
    torch.manual_seed(0)
    model = create_model("tiny_visformer", img_size=32)
    params = dict(model.named_parameters())
    names = perturbed_names(model, "awp")
    sizes = {n: params[n].detach() * 3 for n in names}
    d = random_direction(sizes, seed=4)
    for n in names:
        assert d[n].shape == sizes[n].shape
        assert torch.isclose(d[n].norm(), sizes[n].norm(), rtol=1e-5)
    assert all(torch.equal(d[n], random_direction(sizes, seed=4)[n]) for n in names)
    assert any(not torch.equal(d[n], random_direction(sizes, seed=5)[n]) for n in names)
    # What notebooks 04 and 05 computed inline: one generator, layer by layer.
    gen = torch.Generator().manual_seed(0)
    inline = {n: s.norm() / r.norm() * r for n, s in sizes.items() for r in [torch.randn(s.shape, generator=gen)]}
    ours = random_direction(sizes, generator=torch.Generator().manual_seed(0))
    assert all(torch.allclose(inline[n], ours[n]) for n in names)


def test_applied_perturbs_inside_the_block_and_restores_bitwise():
    torch.manual_seed(0)
    model = create_model("tiny_visformer", img_size=32)
    noise = WeightPerturbation(model, "proxy_attention", gamma=0.01, beta=1.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    d = random_direction({n: before[n] for n in noise.names}, seed=1)
    with noise.applied(d, gamma=0.2) as perturbed:
        assert perturbed is model
        for n in noise.names:
            assert torch.allclose(model.get_parameter(n), before[n] + 0.2 * d[n])
        assert noise.gamma == 0.01, "the noise's own gamma is untouched"
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(RuntimeError, match="inside"):
        with noise.applied(d):
            raise RuntimeError("an error inside the block")
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_load_selected_loads_each_runs_validation_chosen_checkpoint(tmp_path):
    tiny = {k: v for k, v in SMALL.items() if k != "progress"} | {"epochs": 1}
    runs = load_selected(["erm", "trades"], "cpu-demo", root=str(tmp_path), overrides=tiny)
    assert list(runs) == ["erm", "trades"]
    for method, run in runs.items():
        assert run.path.name == ("best_clean.pt" if method == "erm" else "best_robust.pt")
        assert run.epoch == load_checkpoint(run.path)["epoch"] and run.cfg.method == method
        assert not run.model.training
        saved = load_checkpoint(run.path)["model"]
        assert all(torch.equal(v, run.model.state_dict()[k]) for k, v in saved.items())
    again = train_or_load("erm", "cpu-demo", root=str(tmp_path), overrides=tiny, progress=False)
    assert again.start_epoch == 1, "reused, not retrained"


# ------------------------------------------------------------------- the measurement behind the defaults
def test_the_fidelity_rows_differ_from_their_method_only_where_named():
    from robustmed_lite.studies.fidelity import FORMER, variants

    rows = variants(epochs=10)
    for name, row in rows.items():
        settings = {k: v for k, v in row.items() if k != "method"}
        base = load_config("cpu-demo", {"method": row["method"]}).to_dict()
        mine = load_config("cpu-demo", dict(row)).to_dict()
        changed = {k for k in base if base[k] != mine[k]}
        # each optimizer's own default lr, and the weight decay only the AdamW proxy has (None for SGD's)
        derived = {"proxy_lr", "proxy_weight_decay"} if "proxy_optimizer" in settings else set()
        assert changed - derived == set(settings), name  # each named setting changes something, nothing else
    assert {k: rows["robustmed_v0"][k] for k in FORMER} == FORMER
    # awp+warmup doubles awp's clean epochs: 2 -> 4 (noise from epoch 5); AWP's 9 of 200 -> 18 (from epoch 19)
    assert variants(epochs=10, awp_warmup=3)["awp+warmup"]["weight_noise_warmup"] == 5
    assert variants(epochs=200)["awp+warmup"]["weight_noise_warmup"] == 19


def test_fidelity_rows_share_the_plain_clean_run(tmp_path):
    """The rows differ only in robust-stage settings, so every one starts from the same seed's plain ERM run."""
    from robustmed_lite.studies.fidelity import variants
    from robustmed_lite.studies.plan import PROFILES, build_plan

    plan = build_plan(
        PROFILES["cpu"], "phantom", ["trades", "awp", "cap", "robustmed"], [0], tmp_path, variants=variants(10)
    )
    assert [s.name for s in plan if s.init_from is None] == ["erm"]
    assert all(
        s.reference == "erm" and s.init_from == tmp_path / "erm-seed0" / "best_clean.pt"
        for s in plan
        if s.init_from is not None
    )
    # A data setting still gets its own clean run (the cross-site study's rows).
    sites = build_plan(
        PROFILES["cpu"],
        "phantom",
        ["trades"],
        [0],
        tmp_path,
        variants={"trades+crop": {"method": "trades", "lung_crop": True}},
    )
    assert sorted(s.name for s in sites if s.init_from is None) == ["erm", "erm+crop"]


def test_summarise_fidelity_pairs_rows_by_seed():
    from robustmed_lite.studies.fidelity import comparisons, effects_markdown, summarise_fidelity

    rows = []
    for seed in (0, 1, 2):
        for _, row, reference in comparisons():
            for name, shift in ((row, 0.02 * (seed + 1)), (reference, 0.0)):
                rows.append(
                    {
                        "name": name,
                        "seed": seed,
                        "clean_accuracy": 0.8 + shift,
                        "pgd10_train_eps": 0.5 - shift,
                        "pgd10_8_255": 0.3,
                        "ensemble_train_eps": 0.45,
                    }
                )
    runs = pd.DataFrame(rows).drop_duplicates(["name", "seed"])
    effects = summarise_fidelity(runs)
    cap = effects[(effects["row"] == "cap") & (effects["metric"] == "clean_accuracy")].iloc[0]
    assert cap["reference"] == "cap_v0" and cap["n_pairs"] == 3
    assert cap["gain_mean"] == pytest.approx(0.04) and cap["gain_ci_low"] < 0.04 < cap["gain_ci_high"]
    robust = effects[(effects["row"] == "cap") & (effects["metric"] == "pgd10_train_eps")].iloc[0]
    assert robust["gain_mean"] == pytest.approx(-0.04)
    assert "+0.040" in effects_markdown(effects, "test") and "(n=3)" in effects_markdown(effects, "test")
    assert summarise_fidelity(runs[runs["name"] != "trades"]).query("reference == 'trades'").empty


def _saved_before_the_new_fields(cfg) -> dict:
    """A run's saved config as the code wrote it before the fields of ``ADDED_FIELDS`` existed."""
    return {k: v for k, v in cfg.to_dict().items() if k not in ADDED_FIELDS}


@pytest.mark.parametrize(
    "method,overrides,expected",
    [
        ("trades", {}, []),  # the new fields have no effect on TRADES: its old runs are reused
        ("awp", {}, []),  # AWP's proxy was and is the stateless SGD step
        ("cap", FORMER, []),  # the former defaults, stated: the old run is exactly this
        ("cap", {}, ["prior_view", "proxy_lr", "proxy_optimizer", "proxy_weight_decay", "target_grad"]),
        (
            "robustmed",
            {**FORMER, "weight_feedback": True},
            ["weight_feedback", "weight_feedback_halvings", "weight_feedback_share"],
        ),
    ],
)
def test_a_run_saved_before_a_field_existed_matches_only_the_settings_it_was_trained_with(method, overrides, expected):
    old = load_config(
        "cpu-demo", {"method": method, **FORMER} if method in ("cap", "robustmed") else {"method": method}
    )
    saved = _saved_before_the_new_fields(old)
    assert config_differences(saved, load_config("cpu-demo", {"method": method, **overrides})) == expected


def test_a_missing_key_that_is_not_a_known_added_field_is_a_difference():
    cfg = load_config("cpu-demo", {"method": "trades"})
    saved = cfg.to_dict()
    del saved["beta"]
    assert config_differences(saved, cfg) == ["beta"]


def test_the_phantom_study_trains_only_the_rows_of_its_questions(reproduce_calls, tmp_path):
    from robustmed_lite.studies import fidelity

    calls = reproduce_calls
    fidelity.run_fidelity("cpu", data="phantom", out=tmp_path / "phantom", runs=tmp_path / "runs")
    assert calls["methods"] == "cap,robustmed" and set(calls["variants"]) == set(fidelity.PHANTOM_ROWS)
    assert (tmp_path / "phantom" / "table.md").read_text().count("no finished pairs") == 1
    fidelity.run_fidelity("cpu", data=str(tmp_path), out=tmp_path / "real", runs=tmp_path / "runs")
    assert calls["methods"] == "trades,awp,cap,robustmed" and set(calls["variants"]) == set(fidelity.variants(10))


def test_a_renamed_run_folder_is_summarised_under_the_plans_name(tmp_path):
    """Old runs reused under a new row name (the former defaults as ``cap_v0``) keep the record written when the
    folder was called ``cap``: the summary names the row as the plan does, and mCE finds its reference."""
    from robustmed_lite.studies.plan import RunSpec
    from robustmed_lite.studies.run_evaluation import EvalSettings, write_json
    from robustmed_lite.studies.summary import collect_rows

    settings = EvalSettings((4 / 255,), 0, 1, 1, 1, (), None)
    corruptions = pd.DataFrame({"corruption": ["gaussian_noise"] * 2, "severity": [0, 1], "accuracy": [0.9, 0.6]})
    specs = []
    for name, stored, seed in (("erm", "erm", 0), ("cap_v0", "cap", 0)):
        run_dir = tmp_path / f"{name}-seed{seed}"
        run_dir.mkdir()
        write_json(
            settings.eval_file(run_dir),
            {
                "settings": settings.to_dict(),
                "row": {"name": stored, "method": stored.split("_")[0], "seed": seed, "clean_accuracy": 0.8},
            },
        )
        corruptions.to_csv(settings.corruption_file(run_dir), index=False)
        specs.append(RunSpec(name, seed, "cpu-demo", {"method": stored}, run_dir, None))
    rows = collect_rows(specs, settings)
    assert rows["name"].tolist() == ["erm", "cap_v0"]
    assert rows.set_index("name").loc["cap_v0", "mce_all"] == pytest.approx(1.0)  # the same errors as its ERM


def test_a_run_that_trains_on_prior_views_is_evaluated_on_the_plain_splits(tmp_path):
    from robustmed_lite.evaluation.checkpoint_eval import _evaluation_splits

    cfg = _config(tmp_path, method="robustmed", prior_samples=0.5)
    splits = _evaluation_splits(cfg)
    assert cfg.prior_samples == 0 and not cfg.prior and len(splits.test[1]) > 0
