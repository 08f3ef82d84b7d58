"""book/workshop.py: the workshop checks (a right answer passes, and every wrong one gets a line that says what to fix,
never a traceback), and every exercise in the notebooks: its solution passes its check, and its starter gets a helpful
"not yet". (The book build runs the starters too; this runs the folded solutions, which the build never does.)"""

import linecache
import re
from pathlib import Path

import nbformat
import pytest
import torch
import torch.nn.functional as F

from robustmed_lite.book.workshop import EXERCISES, NOT_YET, RIGHT, check
from robustmed_lite.common import eval_mode
from robustmed_lite.components import LOSSES, register_loss
from robustmed_lite.evaluation.attacks import PGD
from robustmed_lite.method.objectives import trades_loss


def verdict(label: str, answer, capsys) -> str:
    """Runs a check as a notebook cell does and returns the one line it printed; the check itself returns None, so
    that the cell shows that line alone (no False under it)."""
    capsys.readouterr()
    assert check(label, answer) is None
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and out.endswith("\n"), f"one line: {out!r}"
    return out.rstrip("\n")


def fgsm_solution(model, x, y, eps):
    with eval_mode(model):
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def fgsm_starter(model, x, y, eps):
    """One signed gradient step."""
    ...


def fgsm_train_mode(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def fgsm_descends(model, x, y, eps):
    with eval_mode(model):
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x - eps * grad.sign()).clamp(0, 1).detach()


def fgsm_unclamped(model, x, y, eps):
    with eval_mode(model):
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).detach()


def fgsm_crashes(model, x, y, eps):
    return x + eps * torch.sign(undefined_gradient)  # noqa: F821 - the mistake under test


@pytest.mark.parametrize(
    "answer, expected, hint",
    [
        (fgsm_solution, RIGHT, "one signed step"),
        (fgsm_starter, NOT_YET, "replace the `...`"),
        (..., NOT_YET, "replace the `...`"),
        (fgsm_train_mode, NOT_YET, "eval mode"),
        (fgsm_descends, NOT_YET, "goes down the loss"),
        (fgsm_unclamped, NOT_YET, "clamp it"),
        (fgsm_crashes, NOT_YET, "NameError: name 'undefined_gradient' is not defined (line"),
    ],
    ids=["solution", "starter", "ellipsis", "train-mode", "descends", "unclamped", "crashes"],
)
def test_fgsm_check(answer, expected, hint, capsys):
    line = verdict("nb02-fgsm", answer, capsys)
    assert line.startswith(f"{expected}: ") and hint in line


def test_masking_check(capsys):
    line = verdict("nb02-masking", PGD("8/255", alpha=2 / 255, steps=10), capsys)  # cross-entropy sees no gradient
    assert line.startswith(f"{NOT_YET}: ") and "accuracy under your attack is 1.00" in line
    line = verdict("nb02-masking", PGD("8/255", alpha=2 / 255, steps=10, loss="margin"), capsys)
    assert line.startswith(f"{RIGHT}: accuracy 1.00 -> 0.00")
    line = verdict("nb02-masking", lambda model, x, y: (x + 0.5).clamp(0, 1), capsys)
    assert line.startswith(f"{NOT_YET}: ") and "within eps = 8/255" in line


def test_defence_check(capsys):
    line = verdict("nb04-defence", "not_registered", capsys)
    assert line.startswith(f"{NOT_YET}: ") and "@register_loss('not_registered', needs_attack=True)" in line

    @register_loss("_workshop_trades", needs_attack=True)
    def solution(model, batch, cfg):
        return trades_loss(model(batch.x).float(), model(batch.x_adv).float(), batch.y, cfg.beta)

    @register_loss("_workshop_detached", needs_attack=True)
    def detached(model, batch, cfg):
        with torch.no_grad():
            return F.cross_entropy(model(batch.x).float(), batch.y)

    try:
        line = verdict("nb04-defence", "_workshop_trades", capsys)
        assert line.startswith(f"{RIGHT}: the Trainer took a step with '_workshop_trades'")
        line = verdict("nb04-defence", "_workshop_detached", capsys)
        assert line.startswith(f"{NOT_YET}: ") and "carries no gradient" in line
    finally:
        LOSSES.unregister("_workshop_trades")
        LOSSES.unregister("_workshop_detached")


def test_an_unknown_label_lists_the_exercises(capsys):
    line = verdict("nb99-nothing", fgsm_solution, capsys)
    assert line.startswith(f"{NOT_YET}: ") and all(label in line for label in EXERCISES)


# ------------------------------------------------------------------------- the other chapters' checks
def window_solution(hu, width, level):
    return ((hu - (level - width / 2)) / width).clamp(0, 1)


def box_solution(x, r):
    import numpy as np

    padded = torch.from_numpy(np.pad(x.numpy(), [(0, 0), (0, 0), (r, r), (r, r)], mode="symmetric"))
    return F.avg_pool2d(padded, 2 * r + 1, stride=1)


def guided_solution(I, p, r, eps):
    from robustmed_lite.method.prior import box_filter

    mean_I, mean_p = box_filter(I, r), box_filter(p, r)
    a = (box_filter(I * p, r) - mean_I * mean_p) / (box_filter(I * I, r) - mean_I**2 + eps)
    b = mean_p - a * mean_I
    return box_filter(a, r) * I + box_filter(b, r)


def pointing_solution(maps, masks):
    peak = maps.flatten(1).argmax(1)
    return masks.flatten(1)[torch.arange(len(peak)), peak].float()


def mce_solution(errors, reference):
    return sum(sum(errors[c]) / sum(reference[c]) for c in errors) / len(errors)


def interval_solution(a, b):
    from scipy import stats

    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    half = stats.t.ppf(0.975, len(d) - 1) * d.std() / len(d) ** 0.5
    return d.mean().item(), (d.mean() - half).item(), (d.mean() + half).item()


def ece_solution(probs, labels):
    import numpy as np

    confidence, correct = probs.max(1), probs.argmax(1) == labels
    which = np.clip(np.digitize(confidence, np.linspace(0, 1, 16)[1:-1], right=True), 0, 14)
    return sum(
        (which == b).mean() * abs(correct[which == b].mean() - confidence[which == b].mean())
        for b in range(15)
        if (which == b).any()
    )


def trades_solution(logits_nat, logits_adv, y, beta):
    log_p, log_q = F.log_softmax(logits_nat, 1), F.log_softmax(logits_adv, 1)
    return F.cross_entropy(logits_nat, y) + beta * (log_p.exp() * (log_p - log_q)).sum(1).mean()


def trades_reversed_kl(logits_nat, logits_adv, y, beta):
    return trades_solution(logits_nat, logits_adv, y, 0.0) + beta * F.kl_div(
        F.log_softmax(logits_nat, 1), F.softmax(logits_adv, 1), reduction="batchmean"
    )


def project_solution(x_adv, x, eps):
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)


def method_loss_solution(logits_nat, logits_adv, logits_aug, y, beta, smooth):
    p_nat, p_adv = F.softmax(logits_nat, 1), F.softmax(logits_adv, 1)
    target = smooth * F.softmax(logits_aug, 1) + (1 - smooth) * F.one_hot(y, 2).to(p_nat.dtype)
    return ((p_nat - target) ** 2).sum(1).mean() + beta * ((p_adv - p_nat) ** 2).sum(1).mean()


def method_loss_onehot_target(logits_nat, logits_adv, logits_aug, y, beta, smooth):
    return method_loss_solution(logits_nat, logits_adv, logits_aug, y, beta, 0.0)


def method_loss_on_logits(logits_nat, logits_adv, logits_aug, y, beta, smooth):
    target = smooth * F.softmax(logits_aug, 1) + (1 - smooth) * F.one_hot(y, 2).to(logits_nat.dtype)
    return ((logits_nat - target) ** 2).sum(1).mean() + beta * ((logits_adv - logits_nat) ** 2).sum(1).mean()


def rescale_solution(dw, w):
    return w.norm() / dw.norm() * dw


@pytest.mark.parametrize(
    "label, solution, mistake, hint",
    [
        ("nb07-loss", method_loss_solution, method_loss_onehot_target, "plain one-hot label"),
        ("nb07-loss", method_loss_solution, method_loss_on_logits, "compares logits"),
        (
            "nb07-loss",
            method_loss_solution,
            lambda n, a, g, y, b, s: method_loss_solution(n, a, g, y, 1.0, s),
            "beta is missing",
        ),
        ("nb07-rescale", rescale_solution, lambda dw, w: dw, "the proxy's step itself"),
        ("nb07-rescale", rescale_solution, lambda dw, w: dw.norm() / w.norm() * dw, "upside down"),
        ("nb07-rescale", rescale_solution, lambda dw, w: dw / dw.norm(), "unit norm"),
        ("nb03-trades", trades_solution, trades_reversed_kl, "the other way round"),
        ("nb03-trades", trades_solution, lambda n, a, y, b: F.cross_entropy(n, y, reduction="none"), "0-d tensor"),
        ("nb03-project", project_solution, lambda x_adv, x, eps: x_adv.clamp(0, 1), "clamped to [0, 1] only"),
        (
            "nb03-project",
            project_solution,
            lambda x_adv, x, eps: torch.min(torch.max(x_adv, x - eps), x + eps),
            "not inside [0, 1]",
        ),
        ("nb00-window", window_solution, lambda hu, w, l: (hu - (l - w / 2)) / w, "clip"),
        ("nb00-window", window_solution, lambda hu, w, l: ((hu - l) / w).clamp(0, 1), "should put L - W/2"),
        (
            "nb01-box",
            box_solution,
            lambda x, r: F.avg_pool2d(F.pad(x, (r,) * 4, mode="replicate"), 2 * r + 1, stride=1),
            "the borders are not",
        ),
        ("nb01-guided", guided_solution, lambda I, p, r, eps: p, "Check a = cov(I, p)"),
        ("nb05-pointing", pointing_solution, lambda maps, masks: torch.ones(len(maps)), "expected [1, 0, 1, 0"),
        (
            "nb06-mce",
            mce_solution,
            lambda e, r: sum(map(sum, e.values())) / sum(map(sum, r.values())),
            "ratio of the total errors",
        ),
        ("nb08-interval", interval_solution, lambda a, b: (0.05, 0.0, 0.1), "expected"),
        ("nb09-ece", ece_solution, lambda probs, labels: 0.0, "15 equal bins"),
    ],
)
def test_chapter_checks(label, solution, mistake, hint, capsys):
    line = verdict(label, solution, capsys)
    assert line.startswith(f"{RIGHT}: "), line
    line = verdict(label, mistake, capsys)
    assert line.startswith(f"{NOT_YET}: ") and hint in line, line


# ---------------------------------------------------------------- the second exercise of chapters 00, 03-08
def noise_solution(noise_hu, width):
    return noise_hu / width * 255


def select_solution(history):
    return int(history.loc[history["val_robust"].idxmax(), "epoch"])


def ratio_solution(maps, masks):
    inside, total = (maps * masks).flatten(1).sum(1), maps.flatten(1).sum(1)
    return torch.where(masks.flatten(1).any(1), inside / total, torch.nan)


def family_solution(table):
    from robustmed_lite.evaluation.corruptions import FAMILY_OF

    corrupted = table[table["severity"] > 0]
    return (
        corrupted.groupby(["model", corrupted["corruption"].map(FAMILY_OF).rename("family")])["accuracy"]
        .mean()
        .unstack()
    )


def seeds_solution(sd, half_width):
    from scipy import stats

    n = 2
    while stats.t.ppf(0.975, n - 1) * sd / n**0.5 > half_width:
        n += 1
    return n


def _batchnorms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]


def adabn_solution(model, x_target):
    model.eval()
    for bn in _batchnorms(model):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        model(x_target)
    return model.eval()


def adabn_whole_model_in_train_mode(model, x_target):
    for bn in _batchnorms(model):
        bn.reset_running_stats()
        bn.momentum = None
    with torch.no_grad():
        model.train()(x_target)
    return model


def adabn_not_reset(model, x_target):
    for bn in _batchnorms(model):
        bn.train()
    with torch.no_grad():
        model(x_target)
    return model.eval()


def adabn_optimizer_step(model, x_target):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = adabn_solution(model, x_target)(x_target)
    (-(logits.softmax(1) * logits.log_softmax(1)).sum(1).mean()).backward()
    optimizer.step()
    return model


def adabn_eval_mode_pass(model, x_target):
    with torch.no_grad():
        model.eval()(x_target)
    return model


@pytest.mark.parametrize(
    "label, solution, mistake, hint",
    [
        ("nb00-noise", noise_solution, lambda noise_hu, width: noise_hu / width, "multiply by 255"),
        ("nb00-noise", noise_solution, lambda noise_hu, width: noise_hu / (width / 2) * 255, "not W/2"),
        ("nb04-select", select_solution, lambda h: int(h["epoch"].iloc[-1]), "that is the last epoch"),
        (
            "nb04-select",
            select_solution,
            lambda h: int(h.loc[h["test_robust"].idxmax(), "epoch"]),
            "the test split must choose nothing",
        ),
        ("nb04-select", select_solution, lambda h: int(h["val_robust"].idxmax()), "0-based position"),
        (
            "nb04-select",
            select_solution,
            lambda h: int(h.loc[h["val_robust"][::-1].idxmax(), "epoch"]),
            "keeps the first",
        ),
        ("nb05-ratio", ratio_solution, lambda maps, masks: (maps * masks).flatten(1).sum(1), "not its share"),
        (
            "nb05-ratio",
            ratio_solution,
            lambda maps, masks: (maps * masks).flatten(1).sum(1) / maps.flatten(1).sum(1),
            "image 4 has an empty mask",
        ),
        (
            "nb06-family",
            family_solution,
            lambda t: t[t["severity"] > 0].groupby(["model", "corruption"])["accuracy"].mean().unstack(),
            "the columns are corruptions",
        ),
        ("nb06-family", family_solution, lambda t: t.groupby("family")["accuracy"].mean(), "no `family` column"),
        ("nb06-family", family_solution, lambda t: family_solution(t).drop("erm"), "no row for erm"),
        ("nb06-family", family_solution, lambda t: family_solution(t).mean(), "models averaged together"),
        (
            "nb08-seeds",
            seeds_solution,
            lambda sd, h: next(n for n in range(2, 99) if 1.96 * sd / n**0.5 <= h),
            "1.96 is the normal quantile",
        ),
        ("nb08-seeds", seeds_solution, lambda sd, h: seeds_solution(sd, h) - 1, "n - 1 degrees of freedom, not n"),
        ("nb09-adabn", adabn_solution, adabn_whole_model_in_train_mode, "comes back in train mode"),
        (
            "nb09-adabn",
            adabn_solution,
            lambda model, x: adabn_whole_model_in_train_mode(model, x).eval(),
            "put only the BatchNorm layers in train mode",
        ),
        ("nb09-adabn", adabn_solution, adabn_not_reset, "keep 90% of the source's"),
        ("nb09-adabn", adabn_solution, adabn_optimizer_step, "no optimizer step"),
        ("nb09-adabn", adabn_solution, adabn_eval_mode_pass, "only in train mode"),
    ],
)
def test_second_chapter_checks(label, solution, mistake, hint, capsys):
    line = verdict(label, solution, capsys)
    assert line.startswith(f"{RIGHT}: "), line
    line = verdict(label, mistake, capsys)
    assert line.startswith(f"{NOT_YET}: ") and hint in line, line


@pytest.mark.parametrize(
    "label", ["nb00-noise", "nb04-select", "nb05-ratio", "nb06-family", "nb08-seeds", "nb09-adabn"]
)
def test_second_chapter_starters(label, capsys):
    def starter(*args): ...

    line = verdict(label, starter, capsys)
    assert line.startswith(f"{NOT_YET}: ") and "replace the `...`" in line


NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


EXERCISE = re.compile(r"```\{exercise\}[^\n]*\n:label: (\S+)")


SOLUTION = re.compile(r"````\{solution\} (\S+)\n.*?```python\n(.*?)```", re.S)


CHECK = re.compile(r'check\("([^"]+)", (\w+)\)')


def _exercises():
    found = {}
    for path in NOTEBOOKS:
        cells = nbformat.read(path, as_version=4).cells
        for label in (m for c in cells if c.cell_type == "markdown" for m in EXERCISE.findall(c.source)):
            starter = [c.source for c in cells if c.cell_type == "code" and f"# Exercise {label}:" in c.source]
            checks = [m for c in cells if c.cell_type == "code" for m in CHECK.findall(c.source) if m[0] == label]
            solutions = [
                code
                for c in cells
                if c.cell_type == "markdown"
                for lab, code in SOLUTION.findall(c.source)
                if lab == label
            ]
            found[label] = (path.name, starter, checks, solutions)
    return found


EXERCISES_IN_NOTEBOOKS = _exercises()


def _run(source: str, name: str, label: str):
    """Runs a cell's code as a notebook would, with its source readable by inspect (as IPython keeps it)."""
    filename = f"<exercise {label} {name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace = {}
    exec(compile(source, filename, "exec"), namespace)
    return namespace


def test_every_exercise_has_a_starter_a_check_and_a_solution():
    assert EXERCISES_IN_NOTEBOOKS, "no exercises found in the notebooks"
    for label, (notebook, starter, checks, solutions) in EXERCISES_IN_NOTEBOOKS.items():
        assert label.startswith(notebook[:2].join(("nb", "-"))), f"{label}: labels start with the notebook's number"
        assert label in EXERCISES, f"{notebook}: {label} has no checker in robustmed_lite.book.workshop"
        assert len(starter) == 1 and len(checks) == 1 and len(solutions) == 1, (notebook, label)


@pytest.mark.parametrize("label", sorted(EXERCISES_IN_NOTEBOOKS))
def test_the_solution_passes_and_the_starter_gets_a_helpful_message(label, capsys):
    _, [starter], [(_, name)], [solution] = EXERCISES_IN_NOTEBOOKS[label]
    line = verdict(label, _run(solution, name, label)[name], capsys)
    assert line.startswith(f"{RIGHT}: "), line
    line = verdict(label, _run(starter, name, label)[name], capsys)
    assert line.startswith(f"{NOT_YET}: ") and "replace the `...`" in line and "Traceback" not in line
