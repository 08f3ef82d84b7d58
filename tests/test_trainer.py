"""trainer.py: every method trains, weight noise is restored exactly, the proxy's state is resumed, the abstract's
readings act as stated, resume is bitwise, configs fail clearly."""

import json

import pytest
import torch
from _small import SMALL

from robustmed_lite.checkpoints import CHECKPOINTS, load_checkpoint
from robustmed_lite.components import LOSSES, register_loss
from robustmed_lite.config import METHODS, load_config
from robustmed_lite.data.loaders import DataError
from robustmed_lite.data.splits import build_data, check_split_classes
from robustmed_lite.trainer import Trainer, attack_steps_at


def _config(tmp_path, **overrides):
    return load_config("cpu-demo", dict(out_dir=str(tmp_path / "run"), **overrides), defaults=SMALL)


@pytest.fixture(scope="module")
def small_data():
    cfg = load_config("cpu-demo", dict(method="robustmed"), defaults=SMALL)
    return build_data(cfg)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_trains_and_lowers_its_loss(method, tmp_path, small_data):
    cfg = _config(tmp_path, method=method, lr=3e-3)
    trainer = Trainer(cfg, data=small_data)
    x, x_aug, y = next(trainer.data.train.batches(32, epoch=0, shuffle=False))[:3]
    torch.manual_seed(0)
    losses = [trainer.train_step(x, x_aug, y, epoch=0, attack=trainer.sample_attack(0))["loss"] for _ in range(12)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < sum(losses[:3]), f"{method}: loss did not go down: {losses}"


def test_two_epochs_write_the_run_record(tmp_path, small_data):
    cfg = _config(tmp_path, method="robustmed")
    history = Trainer(cfg, data=small_data).fit()
    run = cfg.run_dir()
    assert len(history) == 2 and {"val_clean", "val_robust", "train_loss", "epoch_seconds"} <= set(history[0])
    for name in ("config.yaml", "env.json", "log.csv", "log.jsonl", *CHECKPOINTS):
        assert (run / name).exists(), name
    env = json.loads((run / "env.json").read_text())["environment"]
    assert env["packages"]["torch"] == torch.__version__.split("+")[0]
    # the CPU and its kernels: runs of one commit and seed differ between CPUs, so the record names them
    assert env["cpu_model"] and env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    for name in CHECKPOINTS:
        state = torch.load(run / name, weights_only=True)  # plain tensors and containers only
        assert state["config"]["method"] == "robustmed"
    best = load_checkpoint(run / "best_robust.pt")
    assert best["best"]["robust"] == max(r["val_robust"] for r in history[: best["epoch"]])


def test_existing_run_is_not_overwritten(tmp_path, small_data):
    cfg = _config(tmp_path, method="erm", epochs=1)
    Trainer(cfg, data=small_data).fit()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg, data=small_data)


@pytest.mark.parametrize("method", ["robustmed", "cap", "awp"])
def test_resume_is_bitwise_identical(method, tmp_path, small_data):
    # The weight noise starts in epoch 2, so the split after epoch 2 falls where CAP's AdamW proxy (cap,
    # robustmed) already holds moments: last.pt must carry them for the resumed run to be bitwise the same.
    noise_on = dict(weight_noise_warmup=2)  # epochs counted from 1
    full = Trainer(_config(tmp_path / "full", method=method, epochs=3, **noise_on), data=small_data)
    full.fit()
    Trainer(_config(tmp_path / "split", method=method, epochs=3, **noise_on), data=small_data).fit(stop_after=2)
    record = (tmp_path / "split" / "run" / "env.json").read_text()
    saved = load_checkpoint(tmp_path / "split" / "run" / "last.pt")["weight_noise"]
    assert saved["optimizer"] == ("sgd" if method == "awp" else "adamw")
    assert bool(saved["proxy_optim"]["state"]) == (method != "awp"), "AdamW keeps moments, SGD none"
    resumed = Trainer(_config(tmp_path / "split", method=method, epochs=3, **noise_on), data=small_data, resume=True)
    assert resumed.start_epoch == 2
    resumed.fit()
    assert (tmp_path / "split" / "run" / "env.json").read_text() == record, "the original record stays"
    assert '"from_epoch": 2' in (tmp_path / "split" / "run" / "resumed.jsonl").read_text()
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name
    assert [r["val_robust"] for r in full.history] == [r["val_robust"] for r in resumed.history]


def test_same_seed_gives_identical_metrics(tmp_path, small_data):
    runs = [Trainer(_config(tmp_path / str(i), method="trades"), data=small_data).fit() for i in range(2)]
    keys = ("train_loss", "val_clean", "val_robust")
    assert [[r[k] for k in keys] for r in runs[0]] == [[r[k] for k in keys] for r in runs[1]]


@pytest.mark.parametrize("kind", ["awp", "proxy_attention"])
def test_weight_noise_restores_weights_bitwise_with_zero_lr(kind, tmp_path, small_data):
    method = "awp" if kind == "awp" else "cap"
    trainer = Trainer(_config(tmp_path, method=method, lr=0.0, weight_decay=0.0), data=small_data)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    x, x_aug, y = next(trainer.data.train.batches(32, epoch=0))[:3]
    trainer.train_step(x, x_aug, y, epoch=0, attack=trainer.sample_attack(0))
    for name, p in trainer.model.named_parameters():
        assert torch.equal(p, before[name]), name


def test_attack_step_warmup_and_warm_start(tmp_path, small_data):
    cfg = _config(tmp_path, method="trades", attack_steps=10, attack_warmup_epochs=18)
    assert [attack_steps_at(cfg, e) for e in (0, 1, 2, 3, 17, 18, 40)] == [1, 2, 2, 3, 10, 10, 10]  # CAP: 1 + e // 2
    Trainer(cfg, data=small_data).fit()
    warm = _config(tmp_path / "warm", method="robustmed", init_from=str(cfg.run_dir() / "best_clean.pt"))
    started = Trainer(warm, data=small_data)
    source = load_checkpoint(cfg.run_dir() / "best_clean.pt")["model"]
    assert all(torch.equal(v, started.model.state_dict()[k]) for k, v in source.items())


def test_bad_configs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'magic'"):
        load_config("cpu-demo", {"method": "magic"})
    with pytest.raises(ValueError, match="eps"):
        load_config("cpu-demo", {"method": "trades", "eps": "-0.1"})
    with pytest.raises(FileNotFoundError, match="data root .*does not exist"):
        load_config("cpu-demo", {"data": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="unknown config key"):
        load_config("cpu-demo", {"epoch": 3})
    with pytest.raises(FileNotFoundError, match="config 'cpu'"):
        load_config("cpu")
    with pytest.raises(ValueError, match="weight_noise"):
        load_config("cpu-demo", {"method": "robustmed", "weight_noise": "everything"})


def test_a_failed_start_leaves_no_run_directory(tmp_path, small_data):
    with pytest.raises(ValueError, match="unknown model 'resnet9000'"):
        Trainer(_config(tmp_path, method="erm", model="resnet9000"), data=small_data)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        Trainer(_config(tmp_path, method="erm"), data=small_data, resume=True)
    assert not (tmp_path / "run").exists()


def test_training_data_must_hold_both_classes(tmp_path, small_data):
    one_class = {"train": torch.ones(8), "val": torch.tensor([0, 1] * 20), "test": torch.tensor([0, 1] * 20)}
    with pytest.raises(DataError, match="training split of mine holds only 8 COVID images"):
        check_split_classes(one_class, "mine")
    with pytest.warns(UserWarning, match="the test split of mine holds 2 non-COVID, 30 COVID: fewer than 10"):
        check_split_classes({"train": torch.tensor([0, 1]), "test": torch.tensor([0, 0] + [1] * 30)}, "mine")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_channels_last_step(tmp_path, small_data):
    trainer = Trainer(_config(tmp_path, method="robustmed", device="cuda"), data=small_data)
    assert next(trainer.model.parameters()).is_cuda and trainer.cfg.amp and trainer.cfg.channels_last
    x, x_aug, y = next(trainer.data.train.batches(32, epoch=0))[:3]
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    stats = trainer.train_step(x, x_aug, y, 0, trainer.sample_attack(0))
    assert torch.isfinite(torch.tensor(stats["loss"]))
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    row = trainer.validate()
    assert 0 <= row["val_robust"] <= row["val_clean"] + 0.2


def test_resume_refuses_a_different_config(tmp_path, small_data):
    Trainer(_config(tmp_path, method="erm", epochs=1), data=small_data).fit()
    with pytest.raises(ValueError, match="other settings \\(lr\\)"):
        Trainer(_config(tmp_path, method="erm", epochs=1, lr=0.5), data=small_data, resume=True)


def test_the_step_schedule_drops_the_rate_tenfold_after_lr_step_epoch():
    from robustmed_lite.config import load_config
    from robustmed_lite.trainer import _lr_lambda

    cfg = load_config("cpu-demo", {"schedule": "step", "lr_step_epoch": 2, "epochs": 4})
    factor = _lr_lambda(cfg, steps_per_epoch=3)
    assert [factor(step) for step in range(12)] == [1.0] * 6 + [0.1] * 6
    with pytest.raises(ValueError, match="lr_step_epoch"):
        load_config("cpu-demo", {"schedule": "step"})


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
