"""The reproduction command: output schema, reuse of finished runs, resumption of interrupted ones, clear errors."""

import json

import pandas as pd
import pytest
import torch
from _small import SIZES
from PIL import Image

from robustmed_lite.checkpoints import completed_epochs
from robustmed_lite.cli import main
from robustmed_lite.config import METHODS
from robustmed_lite.data.loaders import DataError
from robustmed_lite.studies import reproduce as rep
from robustmed_lite.studies.plan import parse_variant
from robustmed_lite.studies.summary import CLAIMS, SCHEMA, check_results
from robustmed_lite.trainer import Trainer

TINY_TRAIN = dict(SIZES, n_test=24, epochs=1, attack_steps=2, eval_attack_steps=2, weight_noise_warmup=0)
TINY = rep.Profile("tiny", "cpu-demo", TINY_TRAIN, jobs=1, ensemble_n=12, apgd_steps=3, fab_steps=2, square_queries=10)
METHODS_RUN = ("erm", "trades", "robustmed")


def _reproduce(root, out="out", **options):
    """The tiny profile on the phantom, its runs in ``root/runs`` and its results in ``root/<out>``."""
    settings = dict(data="phantom", out=root / out, runs=root / "runs", progress=False, command=["test"])
    return rep.reproduce(TINY, **{**settings, **options})


@pytest.fixture(scope="module")
def reproduction(tmp_path_factory):
    root = tmp_path_factory.mktemp("reproduction")
    return root, _reproduce(root, methods=",".join(METHODS_RUN), seeds="0,1")


def test_every_output_file_has_its_columns(reproduction):
    root, results = reproduction
    out = root / "out"
    runs = pd.read_csv(out / "runs.csv")
    assert sorted(zip(runs["name"], runs["seed"])) == sorted((m, s) for m in METHODS_RUN for s in (0, 1))
    # the columns the results promise (SCHEMA), and the phantom's other site, whose columns SCHEMA leaves open
    assert {*SCHEMA["runs.csv"], "phantom_site_b_accuracy", "phantom_site_b_auc"} <= set(runs.columns)
    assert (runs["ensemble_n"] == 12).all() and (runs["test_n"] == 24).all()
    assert (runs["pgd10_8_255"] <= runs["pgd10_train_eps"] + 1e-9).all()  # 8/255 > the training eps 4/255 here
    assert runs.loc[runs["name"] == "erm", "mce_all"].tolist() == pytest.approx([1.0, 1.0])  # ERM: own reference
    table = pd.read_csv(out / "table.csv")
    assert {"name", "metric", "mean", "ci_low", "ci_high", "std", "n_seeds", "seeds"} <= set(table.columns)
    assert (table["n_seeds"] == 2).all()
    gains = pd.read_csv(out / "gains.csv")
    assert set(gains["comparator"]) == {"best prior method", "best prior defence"}
    assert set(gains["best_prior"]) <= {"erm", "trades"} and (gains["method"] == "robustmed").all()
    defence = gains[gains["comparator"] == "best prior defence"]
    assert set(defence["best_prior"]) == {"trades"}  # the only prior defence run here
    verdicts = pd.read_csv(out / "verdicts.csv")
    assert set(verdicts["claim"]) == {c.name for c in CLAIMS}
    assert set(verdicts["verdict"]) <= {"reproduced", "not reproduced", "inconclusive"}
    assert verdicts["rule"].str.contains("hi < claimed gain").all()
    for name in (
        "table.md",
        "metrics.png",
        "robust_vs_clean.png",
        "environment.json",
        "profile.json",
        "commands.txt",
        "ensemble_check.csv",
    ):
        assert (out / name).stat().st_size > 0, name
    frames = check_results(out)  # the schema the notebook checks too
    assert set(frames) == set(SCHEMA)
    check = frames["ensemble_check.csv"]
    assert {"clean", "ensemble", "APGD-CE-3", "APGD-MARGIN-3", "FAB-2", "Square-10"} <= set(check["condition"])
    assert check["ensemble_at_least_as_strong"].all()
    assert json.loads((out / "environment.json").read_text())["environment"]["packages"]["torch"]
    assert "verdict" in (out / "table.md").read_text()


def test_check_results_names_what_is_missing(reproduction, tmp_path):
    root, _ = reproduction
    with pytest.raises(FileNotFoundError, match="runs.csv is missing"):
        check_results(tmp_path)
    for name in SCHEMA:
        (tmp_path / name).write_text((root / "out" / name).read_text())
    pd.read_csv(tmp_path / "gains.csv").drop(columns="gain_ci_low").to_csv(tmp_path / "gains.csv", index=False)
    with pytest.raises(ValueError, match=r"gains.csv lacks the columns \['gain_ci_low'\]"):
        check_results(tmp_path)


def test_summary_numbers_are_the_runs_numbers(reproduction):
    root, _ = reproduction
    runs = pd.read_csv(root / "out" / "runs.csv")
    table = pd.read_csv(root / "out" / "table.csv").set_index(["name", "metric"])
    for name in METHODS_RUN:
        values = runs.loc[runs["name"] == name, "clean_accuracy"]
        assert table.loc[(name, "clean_accuracy"), "mean"] == pytest.approx(values.mean())
    gains = pd.read_csv(root / "out" / "gains.csv")
    row = gains[(gains["metric"] == "clean_accuracy") & (gains["comparator"] == "best prior defence")].iloc[0]
    ours = runs[runs["name"] == "robustmed"].set_index("seed")["clean_accuracy"]
    theirs = runs[runs["name"] == "trades"].set_index("seed")["clean_accuracy"]
    assert row["gain_mean"] == pytest.approx((ours - theirs).mean())


def test_a_second_call_redoes_nothing(reproduction, monkeypatch):
    root, first = reproduction

    def refuse(*args, **kwargs):
        raise AssertionError("a finished run was trained or evaluated again")

    monkeypatch.setattr(Trainer, "fit", refuse)
    monkeypatch.setattr(rep, "evaluate_run", refuse)
    monkeypatch.setattr("robustmed_lite.evaluation.ood.corruption_table", refuse)
    monkeypatch.setattr(rep, "completed_epochs", refuse)  # finished runs are known by their marker alone
    monkeypatch.setattr(rep, "ensemble_check", refuse)
    again = _reproduce(root, methods=",".join(METHODS_RUN), seeds="0,1")
    pd.testing.assert_frame_equal(again["runs"], first["runs"])
    assert len((root / "out" / "commands.txt").read_text().splitlines()) == 2  # every call is recorded


def test_an_interrupted_run_resumes(tmp_path):
    plan = rep.build_plan(TINY, "phantom", ("erm",), (0,), tmp_path / "runs", {"epochs": 2})
    interrupted = Trainer(plan[0].config())
    interrupted.fit(stop_after=1)  # as if killed after the first epoch
    assert completed_epochs(plan[0].run_dir) == 1
    _reproduce(tmp_path, methods="erm", seeds="0", overrides={"epochs": 2})
    assert completed_epochs(plan[0].run_dir) == 2
    resumed = [json.loads(line) for line in (plan[0].run_dir / "resumed.jsonl").read_text().splitlines()]
    assert [r["from_epoch"] for r in resumed] == [1]


def test_a_finished_run_with_other_settings_is_not_reused(reproduction):
    root, _ = reproduction
    with pytest.raises(ValueError, match=r"erm-seed0 holds a run with other settings \(beta\)"):
        _reproduce(root, "other", methods="erm", seeds="0", overrides={"beta": 1.0})


def test_two_stages_start_robust_runs_from_the_clean_run(tmp_path):
    plan = rep.build_plan(TINY, "phantom", ("trades", "cap"), (0, 1), tmp_path)
    assert [s.name for s in plan[:2]] == ["erm", "erm"]  # the clean runs come first, always in the plan
    for spec in plan[2:]:
        assert spec.init_from == tmp_path / f"erm-seed{spec.seed}" / "best_clean.pt"
        assert spec.config().init_from == str(spec.init_from)


def test_shards_split_the_plan_and_own_their_clean_runs(tmp_path):
    plan = rep.build_plan(TINY, "phantom", tuple(METHODS), (0, 1, 2), tmp_path)
    shards = [rep.shard_of(plan, (i, 3)) for i in (1, 2, 3)]
    names = [(s.name, s.seed) for shard in shards for s in shard]
    assert sorted(names) == sorted((s.name, s.seed) for s in plan) and len(set(names)) == len(plan)
    for i, shard in enumerate(shards):
        clean = [s for s in shard if s.name == "erm"]
        assert [s.seed for s in clean] == [i]  # seed s's clean run lives in shard s mod n
        assert shard[0].name == "erm"  # and comes first there


def test_variants_add_rows_that_are_not_prior_methods(tmp_path):
    name, values = parse_variant("trades+long=trades,epochs=3")
    assert name == "trades+long" and values == {"method": "trades", "epochs": "3"}
    plan = rep.build_plan(TINY, "phantom", ("trades",), (0,), tmp_path, variants={name: values})
    # The variant's robust run starts from a clean run with the same settings, added for it (stage 1 of CAP).
    assert [s.name for s in plan] == ["erm", "erm+long", "trades", "trades+long"]
    variant = plan[-1]
    assert variant.config().epochs == 3 and variant.reference == "erm+long"
    assert variant.init_from == tmp_path / "erm+long-seed0" / "best_clean.pt" and plan[1].config().epochs == 3
    # A setting of the robust stage only (beta) changes nothing of the clean run: the variant shares plain ERM's.
    beta = rep.build_plan(
        TINY, "phantom", ("trades",), (0,), tmp_path, variants={"trades+beta3": {"method": "trades", "beta": "3"}}
    )
    assert [s.name for s in beta] == ["erm", "trades", "trades+beta3"]
    assert beta[-1].config().beta == 3.0 and beta[-1].reference == "erm"
    with pytest.raises(ValueError, match="taken by a method"):
        rep.build_plan(TINY, "phantom", ("trades",), (0,), tmp_path, variants={"mart": {"method": "mart"}})
    with pytest.raises(ValueError, match="NAME=METHOD"):
        parse_variant("just-a-name")


def _one_class_folder(root):
    (root / "COVID").mkdir(parents=True)
    for i in range(3):
        Image.fromarray((torch.rand(16, 16) * 255).byte().numpy()).save(root / "COVID" / f"{i}.png")
    return root


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(methods="erm,resnet_at"), ValueError, "unknown method"),
        (dict(seeds="0,one"), ValueError, "cannot read seeds"),
        (dict(seeds="1,1"), ValueError, "distinct"),
        (dict(shard="3/2"), ValueError, "--shard"),
        (dict(ood_data=["/nonexistent/ucsd"]), FileNotFoundError, "--ood_data /nonexistent/ucsd does not exist"),
        (dict(profile="laptop"), ValueError, "unknown profile"),
    ],
)
def test_bad_input_is_a_clear_error(tmp_path, kwargs, error, match):
    args = dict(profile=TINY, data="phantom", out=tmp_path / "out", runs=tmp_path / "runs", progress=False)
    with pytest.raises(error, match=match):
        rep.reproduce(**{**args, **kwargs})
    assert not (tmp_path / "runs").exists()  # refused before anything was trained


def test_data_without_two_classes_is_refused(tmp_path):
    data = _one_class_folder(tmp_path / "one_class")
    with pytest.raises(DataError, match="holds only COVID images .* needs both classes"):
        _reproduce(tmp_path, data=str(data))
    with pytest.raises(FileNotFoundError, match="--data /nonexistent does not exist"):
        _reproduce(tmp_path, data="/nonexistent")


def test_the_cli_parses_its_options(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        rep,
        "reproduce",
        lambda *a, **k: seen.update(args=a, kwargs=k) or {"runs": pd.DataFrame(), "verdicts": pd.DataFrame()},
    )
    assert (
        main(
            [
                "reproduce",
                "--profile",
                "cpu",
                "--data",
                "phantom",
                "--methods",
                "erm,cap",
                "--seeds",
                "0-2",
                "--epochs",
                "3",
                "--beta",
                "2",
                "--variant",
                "cap+x=cap,gamma=0.01",
                "--ensemble_n",
                "all",
                "--out",
                str(tmp_path),
                "--quiet",
            ]
        )
        == 0
    )
    kwargs = seen["kwargs"]
    assert seen["args"] == ("cpu",) and kwargs["overrides"] == {"beta": 2.0, "epochs": 3}
    assert kwargs["variants"] == {"cap+x": {"method": "cap", "gamma": "0.01"}} and kwargs["ensemble_n"] is None
    assert rep.parse_seeds("0-2") == (0, 1, 2)


def test_the_paper_preset_names_its_method_and_needs_data():
    from robustmed_lite.config import load_config

    with pytest.raises(ValueError, match="data is not set: this preset trains on real CT. Fix: pass --data"):
        load_config("paper")
    plan_profile = rep.PROFILES["paper"]
    assert plan_profile.two_stage and plan_profile.preset == "paper"
    import yaml

    from robustmed_lite.config import CONFIG_DIR

    preset = yaml.safe_load((CONFIG_DIR / "paper.yaml").read_text())
    assert preset["method"] == "robustmed" and "weight_noise_warmup" not in preset  # each method's own (CAP: 20)
    assert preset["cosine_period"] == 100 and preset["epochs"] == 200


def test_the_paper_profile_plans_both_of_caps_stages(tmp_path):
    data = tmp_path / "sarscov2"
    data.mkdir()
    plan = rep.build_plan(rep.PROFILES["paper"], str(data), ("erm", "cap", "robustmed"), (1234,), tmp_path / "runs")
    clean, *robust = plan
    assert clean.name == "erm" and clean.init_from is None
    for spec in robust:
        cfg = spec.config()
        assert cfg.init_from == str(tmp_path / "runs" / "erm-seed1234" / "best_clean.pt")
        assert (cfg.img_size, cfg.epochs, cfg.batch_size, cfg.cosine_period) == (224, 200, 24, 100)
        assert cfg.pretrained and cfg.weight_noise_warmup == 20 and cfg.target_grad
        assert cfg.eps == pytest.approx(0.03) and cfg.model == "visformer_tiny"


def test_caps_schedule_falls_to_zero_and_climbs_back():
    from robustmed_lite.config import load_config
    from robustmed_lite.trainer import _lr_lambda

    cfg = load_config("cpu-demo", {"epochs": 200, "cosine_period": 100})
    factor = _lr_lambda(cfg, steps_per_epoch=10)
    assert factor(0) == pytest.approx(1.0)
    assert factor(1000) == pytest.approx(0.0, abs=1e-12)  # epoch 100: the bottom
    assert factor(500) == pytest.approx(0.5) and factor(1500) == pytest.approx(0.5)  # symmetric, no jump
    assert factor(1999) == pytest.approx(1.0, abs=1e-4)  # back up at the end (CosineAnnealingLR(T_max=100))
    plain = _lr_lambda(load_config("cpu-demo", {"epochs": 200}), steps_per_epoch=10)
    assert plain(1000) == pytest.approx(0.5) and plain(1999) < 1e-4  # the default: one half-wave per run


def test_new_evaluation_settings_rescore_without_retraining(reproduction, monkeypatch):
    root, _ = reproduction
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = _reproduce(root, "rescored", methods="erm", seeds="0", ensemble_n=6)
    assert (again["runs"]["ensemble_n"] == 6).all()
    assert len(list((root / "runs" / "erm-seed0").glob("eval-*.json"))) == 2  # both evaluations are kept


def test_gains_point_the_same_way_for_lower_is_better_metrics():
    from robustmed_lite.studies.summary import summarise

    rows = []
    for seed, (ours, trades, mart) in enumerate(((0.8, 1.2, 1.1), (0.9, 1.3, 1.0), (1.0, 1.1, 1.2))):
        for name, mce in (("robustmed", ours), ("trades", trades), ("mart", mart)):
            rows.append({"name": name, "method": name, "seed": seed, "mce_all": mce, "clean_accuracy": 0.8})
    gains = summarise(pd.DataFrame(rows))["gains"].set_index(["metric", "comparator"])
    g = gains.loc[("mce_all", "best prior method")]
    assert g["best_prior"] == "mart"  # the lowest mean mCE (1.1 against trades' 1.2) is the best prior
    assert not g["higher_is_better"]
    assert g["gain_mean"] == pytest.approx(((1.1 - 0.8) + (1.0 - 0.9) + (1.2 - 1.0)) / 3)  # positive: lower mCE


def test_several_jobs_train_the_clean_run_first(tmp_path):
    results = _reproduce(tmp_path, methods="trades", seeds="0", jobs=2, ensemble_n=0)
    assert sorted(results["runs"]["name"]) == ["erm", "trades"]
    config = (tmp_path / "runs" / "trades-seed0" / "config.yaml").read_text()
    assert str(tmp_path / "runs" / "erm-seed0" / "best_clean.pt") in config
    assert json.loads((tmp_path / "out" / "timings.json").read_text())[0]["runs"] == 2


def test_a_shard_waits_for_the_clean_run_of_another_shard(tmp_path):
    plan = rep.build_plan(TINY, "phantom", ("trades",), (0,), tmp_path)
    robust = plan[-1]
    with pytest.raises(TimeoutError, match="erm-seed0 did not finish training"):
        rep.train_run(robust, wait_poll=0.01, wait_timeout=0.05)


def test_training_at_8_255_fills_both_eps_columns(tmp_path):
    results = _reproduce(tmp_path, methods="erm", seeds="0", overrides={"eps": "8/255"}, ensemble_n=6)
    row = results["runs"].iloc[0]
    assert row["train_eps"] == "8/255"
    assert row["pgd10_train_eps"] == row["pgd10_8_255"] and row["ensemble_train_eps"] == row["ensemble_8_255"]


def test_orphan_checkpoints_of_a_killed_first_epoch_are_cleared(tmp_path):
    plan = rep.build_plan(TINY, "phantom", ("erm",), (0,), tmp_path)
    spec = plan[0]
    spec.run_dir.mkdir(parents=True)
    (spec.run_dir / "best_clean.pt").write_bytes(b"")  # killed after best_clean.pt, before last.pt
    with pytest.warns(UserWarning, match="without last.pt"):
        rep.train_run(spec)
    assert completed_epochs(spec.run_dir) == 1 and (spec.run_dir / rep.TRAINED).exists()


def test_a_resumed_run_repairs_a_log_that_missed_its_last_epoch(tmp_path):
    from robustmed_lite.config import load_config

    chosen = {"epochs": 2, "out_dir": str(tmp_path / "run"), "progress": False}
    cfg = load_config("cpu-demo", chosen, defaults=TINY.train)  # the profile's settings, as a study applies them
    Trainer(cfg).fit(stop_after=1)
    log = tmp_path / "run" / "log.jsonl"
    log.write_text("")  # killed after last.pt, before the log row was appended
    Trainer(cfg, resume=True).fit()
    assert [json.loads(line)["epoch"] for line in log.read_text().splitlines()] == [1, 2]


def test_a_site_the_run_trained_on_is_not_scored_as_another_site(shared_data):
    from robustmed_lite.config import load_config
    from robustmed_lite.studies.run_evaluation import EvalSettings, _domains

    ucsd = str(shared_data / "ucsd_covidct")
    cfg = load_config("cpu-demo", {"data": str(shared_data / "sarscov2"), "extra_data": ucsd, "img_size": 32})
    for spec in (ucsd, f"{ucsd}:train"):
        settings = EvalSettings((4 / 255,), 0, 1, 1, 1, (spec,), None)
        with pytest.raises(ValueError, match="holds training images"):
            _domains(cfg, None, settings)
