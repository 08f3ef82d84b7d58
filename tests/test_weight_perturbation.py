"""method/weight_perturbation.py: the proxy loss, the noise direction d_l = ||w_l|| / ||dw_l|| * dw_l on the chosen
weights only, exact restoring, CAP's stateful AdamW proxy, random directions, and weight sensitivity (weights come
back bitwise, gamma = 0 is the model's accuracy, draws are seeded, large relative noise destroys a trained model)."""

import copy
import re

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from robustmed_lite.data.phantom import make_phantom_dataset
from robustmed_lite.evaluation.attacks import PGD
from robustmed_lite.evaluation.metrics import accuracy
from robustmed_lite.method.weight_perturbation import (
    WeightPerturbation,
    perturbed_names,
    random_direction,
    relative_diff,
    weight_sensitivity,
)
from robustmed_lite.models import attention_weights, create_model
from robustmed_lite.trainer import fit_erm

GAMMAS = [0, 0.05, 0.3, 1.0, 3.0]


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    train = make_phantom_dataset(512, 32, site="A", seed=0)
    test = make_phantom_dataset(128, 32, site="A", seed=2)
    model = create_model("small_cnn", img_size=32)
    fit_erm(model, train.images, train.labels, epochs=10, batch_size=64, lr=3e-3, seed=0, progress=False)
    return model.eval(), test.images, test.labels


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_weights_restored_bitwise_and_modes_kept(trained):
    model, x, y = trained
    before = _snapshot(model)
    model.train()
    weight_sensitivity(model, x, y, [0, 0.1, 1.0], draws=2, attack=PGD("2/255", steps=2, seed=0), attack_n=32)
    assert model.training and all(m.training for m in model.modules()), "the model's modes are restored"
    model.eval()
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_zero_gamma_is_the_models_accuracy(trained):
    model, x, y = trained
    table = weight_sensitivity(model, x, y, [0], draws=3)
    assert list(table.columns) == ["gamma", "draw", "condition", "accuracy", "n"]
    assert len(table) == 3 and (table.n == len(y)).all()
    assert (table.accuracy == accuracy(model, x, y)).all()


def test_deterministic_under_seed(trained):
    model, x, y = trained
    a = weight_sensitivity(model, x, y, [0.3, 1.0], draws=2, seed=5)
    b = weight_sensitivity(model, x, y, [0.3, 1.0], draws=2, seed=5)
    pd.testing.assert_frame_equal(a, b)


def test_large_noise_degrades_a_trained_model(trained):
    model, x, y = trained
    clean = accuracy(model, x, y)
    assert clean > 0.75, f"the fixture model did not learn: {clean:.3f}"
    table = weight_sensitivity(model, x, y, GAMMAS, draws=3, seed=0)
    mean = table.groupby("gamma").accuracy.mean()
    assert mean[0.05] > clean - 0.1, "a 5% relative perturbation barely hurts"
    assert mean[3.0] < clean - 0.2, "noise three times the weights' own norm destroys the model"
    assert (mean.diff().dropna() <= 0.05).all(), f"accuracy should fall (almost) monotonically: {mean.to_dict()}"


def test_attack_rows_and_names(trained):
    model, x, y = trained
    attention_free = perturbed_names(model, "awp")[-1:]  # the head only
    table = weight_sensitivity(
        model, x, y, [0, 0.2], draws=1, names=attention_free, attack=PGD("2/255", steps=3, seed=0), attack_n=48
    )
    wide = table.pivot_table(index="gamma", columns="condition", values="accuracy")
    assert set(wide.columns) == {"clean", "PGD-3"}
    assert (table[table.condition == "PGD-3"].n == 48).all()
    assert (wide["PGD-3"] <= 1.0).all() and (wide["PGD-3"] >= 0).all()
    with pytest.raises(ValueError, match="no parameters"):
        weight_sensitivity(model, x, y, [0.1], names=["not.a.weight"])


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


def test_proxy_noise_touches_only_attention_with_the_stated_norm_ratio():
    torch.manual_seed(0)
    model = create_model("tiny_visformer", img_size=32)
    data = make_phantom_dataset(16, 32, seed=0)
    gamma = 0.01
    noise = WeightPerturbation(model, "proxy_attention", gamma=gamma, beta=3.0)
    assert set(noise.names) == set(attention_weights(model)) and noise.names
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    noise.perturb(noise.compute(data.images, data.images.flip(-1), data.labels))
    for name, p in model.named_parameters():
        change = (p - before[name]).norm()
        if name in noise.names:
            assert torch.isclose(change, gamma * before[name].norm(), rtol=1e-3), name
        else:
            assert change == 0, f"{name} was perturbed"
    noise.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_awp_perturbs_every_weight_matrix_and_cnns_have_no_attention():
    cnn = create_model("small_cnn")
    names = perturbed_names(cnn, "awp")
    assert names and all(cnn.get_parameter(n).dim() > 1 for n in names)
    with pytest.raises(ValueError, match="attention weights"):
        perturbed_names(cnn, "proxy_attention")


def test_proxy_reloads_bn_buffers_and_keeps_no_optimizer_state():
    torch.manual_seed(0)
    model = create_model("tiny_visformer", img_size=32)
    model.train()
    data = make_phantom_dataset(16, 32, seed=0)
    model(data.images)  # move the model's BN running stats away from the proxy's initial copy
    noise = WeightPerturbation(model, "proxy_attention", gamma=0.01, beta=3.0)
    noise.proxy.load_state_dict(
        {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in noise.proxy.state_dict().items()}
    )
    noise.compute(data.images, data.images, data.labels)
    assert not noise.proxy_optim.state
    proxy_means = [b for n, b in noise.proxy.named_buffers() if n.endswith("running_mean")]
    assert all(torch.isfinite(b).all() and b.abs().sum() > 0 for b in proxy_means)


# --------------------------------------------------------- the noise direction and the proxy loss, by hand
class _TinyAttention(nn.Module):
    """logits = H (P (Q x + q) + p) + h: Q and P sit where ``attention_weights`` finds attention (``attn.qkv``,
    ``attn.proj``), H is a head that the attention noise must leave alone."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.qkv, self.attn.proj, self.head = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
        with torch.no_grad():
            for layer, (w, b) in zip(
                (self.attn.qkv, self.attn.proj, self.head),
                (
                    ([[1.0, 0.5], [-0.5, 1.0]], [0.1, 0.0]),
                    ([[0.8, 0.0], [0.3, 1.2]], [0.0, -0.2]),
                    ([[1.0, 2.0], [0.5, -1.0]], [0.1, -0.2]),
                ),
            ):
                layer.weight.copy_(torch.tensor(w))
                layer.bias.copy_(torch.tensor(b))
        self.double()

    def forward(self, x):
        return self.head(self.attn.proj(self.attn.qkv(x)))


X = np.array([[1.0, 0.0], [0.5, 2.0]])  # two samples
X_OTHER = np.array([[0.0, 1.0], [1.0, 1.0]])  # their other view (x_aug, or x_adv for AWP)
LABELS = np.array([0, 1])


def _np_weights(model) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in model.named_parameters()}


def _np_forward(w: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h1, h2, logits) of the tiny model, row per sample."""
    h1 = x @ w["attn.qkv.weight"].T + w["attn.qkv.bias"]
    h2 = h1 @ w["attn.proj.weight"].T + w["attn.proj.bias"]
    return h1, h2, h2 @ w["head.weight"].T + w["head.bias"]


def _np_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _np_ce_and_kl(w, x, x_other, y) -> tuple[float, float]:
    p, q = _np_softmax(_np_forward(w, x)[2]), _np_softmax(_np_forward(w, x_other)[2])
    ce = -np.log(p[np.arange(len(y)), y]).mean()
    kl = (p * np.log(p / q)).sum(1).mean()
    return ce, kl


def _t64(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a).double()


@pytest.mark.parametrize("kind", ["awp", "proxy_attention"])
def test_the_proxy_loss_by_hand(kind):
    """The proxy minimises -CE(x) + beta KL(p(x) || p(x_aug)) (attention noise: adversarial for the clean loss,
    consistent with the prior view) or -(CE(x) + beta KL(p(x) || p(x_adv))) (AWP)."""
    model = _TinyAttention()
    noise = WeightPerturbation(model, kind, gamma=0.01, beta=3.0)
    ce, kl = _np_ce_and_kl(_np_weights(model), X, X_OTHER, LABELS)
    expected = -(ce + 3.0 * kl) if kind == "awp" else -ce + 3.0 * kl
    got = noise.proxy_loss(_t64(X), _t64(X_OTHER), torch.from_numpy(LABELS)).item()
    assert got == pytest.approx(expected, rel=1e-6)  # the proxy's losses are computed in float32
    assert kl > 0 and ce > 0  # both terms count in the check


@pytest.mark.parametrize("kind", ["awp", "proxy_attention"])
def test_the_noise_direction_is_the_proxys_step_rescaled_to_each_layers_norm(kind):
    """With beta = 0 and plain SGD, the proxy's step is dw = lr * dCE/dw (one step up the clean loss), so
    d_l = ||w_l|| / ||dw_l|| * dw_l = ||w_l|| / ||G_l|| * G_l with G the hand-computed CE gradient (lr cancels);
    only the chosen weights get a direction: Q and P for attention noise, every weight matrix for AWP, no bias."""
    model = _TinyAttention()
    w = _np_weights(model)
    noise = WeightPerturbation(model, kind, gamma=0.01, beta=0.0, proxy_lr=0.05, optimizer="sgd")
    d = noise.compute(_t64(X), _t64(X_OTHER), torch.from_numpy(LABELS))
    chosen = ["attn.qkv.weight", "attn.proj.weight"] + (["head.weight"] if kind == "awp" else [])
    assert sorted(d) == sorted(chosen)
    # backpropagation by hand: delta = (p - onehot) / N at the logits
    h1, h2, logits = _np_forward(w, X)
    delta = (_np_softmax(logits) - np.eye(2)[LABELS]) / len(X)
    grads = {
        "head.weight": delta.T @ h2,
        "attn.proj.weight": (delta @ w["head.weight"]).T @ h1,
        "attn.qkv.weight": (delta @ w["head.weight"] @ w["attn.proj.weight"]).T @ X,
    }
    for name in chosen:
        g = grads[name]
        expected = np.linalg.norm(w[name]) / np.linalg.norm(g) * g
        np.testing.assert_allclose(d[name].numpy(), expected, rtol=1e-5, atol=1e-8)  # float32 losses
        assert np.linalg.norm(d[name].numpy()) == pytest.approx(np.linalg.norm(w[name]))
    # the model itself is untouched by computing the noise
    assert all(np.array_equal(p.detach().numpy(), w[n]) for n, p in model.named_parameters())


def test_perturb_adds_gamma_d_and_restore_keeps_only_the_optimizers_update():
    """w <- w + gamma d on the chosen weights only; after an optimizer step at the perturbed weights, restore gives
    w_0 + (w_stepped - w_perturbed), i.e. the update applied to the unperturbed weights; with no step, bitwise w_0."""
    model = _TinyAttention()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    noise = WeightPerturbation(model, "proxy_attention", gamma=0.1, beta=1.0)
    d = {n: torch.full_like(before[n], 0.5) for n in noise.names}
    noise.perturb(d)
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n] + 0.1 * d[n]) if n in d else torch.equal(p, before[n]), n
    with pytest.raises(RuntimeError, match="twice"):
        noise.perturb(d)
    noise.restore()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters()), "restored bitwise"

    # a step of plain SGD (lr 0.5) on the loss at the perturbed weights
    noise.perturb(d, gamma=0.2)
    perturbed = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(_t64(X)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    noise.restore()
    for n, p in model.named_parameters():
        assert torch.allclose(p, before[n] - 0.5 * grads[n], rtol=0, atol=1e-12), n
    moved = [n for n in d if not torch.allclose(perturbed[n], before[n])]
    assert sorted(moved) == sorted(d), "the step was taken at the perturbed weights"


def test_the_chosen_weights_of_a_visformer():
    """Attention noise: only the qkv and proj weights of the attention blocks; AWP: every weight matrix, which
    includes them, and never a bias or a norm's scale."""
    model = create_model("tiny_visformer", img_size=32)
    attention = perturbed_names(model, "proxy_attention")
    every = perturbed_names(model, "awp")
    assert attention and all(re.search(r"attn\.(qkv|proj)\.weight$", n) for n in attention)
    assert set(attention) < set(every)
    params = dict(model.named_parameters())
    assert all(params[n].dim() > 1 for n in every)
    assert not [n for n in every if n.endswith("bias") or ".norm" in n]
