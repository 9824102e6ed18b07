"""`cmboost tune`: judges kept apart, the choice rule, resume, and `boost --settings`."""

import json

import numpy as np
import pytest
import torch

from cmboost.cli import main as cli_main
from cmboost.controls import gaussian_blur
from cmboost.data import load_dataset
from cmboost.samples import save_samples, to_float, to_uint8
from cmboost.demo import ASSETS
from cmboost.errors import UserInputError
from cmboost.jcd import load_joint_model
from cmboost.metrics.features import load_feature_extractor
from cmboost.metrics.judges import REPORTING_JUDGES, TUNING_JUDGE, check_tuning_judge
from cmboost.metrics.reference import reference_stats, save_reference
from cmboost.tune import BOOST_METHODS, tune

GRID = [("pgd", {"eps": 1.0, "steps": 3}), ("pgd", {"eps": 3.0, "steps": 3}), ("sgld", {"steps": 3, "step": 0.2}),
        ("bigroc", {"eps": 1.0, "steps": 3}), ("unsharp", {"amount": 1.0, "sigma": 1.0})]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Blurred real training images stand in for generated ones; the reference is other training images."""
    root = tmp_path_factory.mktemp("tune")
    train, labels, _ = load_dataset("fmnist", "train", image_size=32)
    samples = to_uint8(gaussian_blur(to_float(train[1000:1040]), 1.0))
    save_samples(root / "val.npz", samples, labels[1000:1040])
    judge = load_feature_extractor(TUNING_JUDGE, "cpu")
    ref = reference_stats(train[:400], judge, source="fmnist train")
    save_reference(root / "train-ref.npz", ref)
    test_ref = reference_stats(train[400:800], judge, source="fmnist test")
    save_reference(root / "test-ref.npz", test_ref)
    return root, judge, ref


def models():
    return load_joint_model(ASSETS / "jcd-joint.safetensors"), load_joint_model(ASSETS / "jcd-ce.safetensors")


def test_tune_writes_the_best_settings_with_the_tuning_judge_recorded(setup):
    root, judge, ref = setup
    model, classifier = models()
    settings = tune(root / "val.npz", model, ref, judge, root / "tuned.json", classifier=classifier, grid=GRID,
                    progress=False)
    saved = json.loads((root / "tuned.json").read_text())
    assert saved == json.loads(json.dumps(settings))
    assert saved["judge"] == {"name": TUNING_JUDGE, "identity": judge.identity, "role": "tuning"}
    assert saved["best"] in BOOST_METHODS and set(saved["methods"]) == {"pgd", "sgld", "bigroc", "unsharp"}
    assert len(saved["candidates"]) == len(GRID) + 1 and saved["candidates"][0]["method"] == "none"
    pgd = [c for c in saved["candidates"] if c["method"] == "pgd"]
    assert saved["methods"]["pgd"]["metrics"]["fid"] == min(c["metrics"]["fid"] for c in pgd)
    for c in saved["candidates"][1:]:
        assert c["mean_l2_change"] > 0 and np.isfinite(c["metrics"]["kid"])
    assert not (root / "tuned.json.partial.json").exists()
    with pytest.raises(UserInputError, match="exists"):
        tune(root / "val.npz", model, ref, judge, root / "tuned.json", grid=GRID[:1], progress=False)


def test_tune_resumes_after_an_interruption(setup, monkeypatch):
    root, judge, ref = setup
    model, classifier = models()
    import cmboost.tune as tune_module

    real_run = tune_module.run_method
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(tune_module, "run_method", flaky)
    with pytest.raises(KeyboardInterrupt):
        tune(root / "val.npz", model, ref, judge, root / "resumed.json", classifier=classifier, grid=GRID,
             progress=False)
    partial = json.loads((root / "resumed.json.partial.json").read_text())
    assert len(partial["rows"]) == 3  # none + two candidates
    monkeypatch.setattr(tune_module, "run_method", real_run)
    resumed = tune(root / "val.npz", model, ref, judge, root / "resumed.json", classifier=classifier, grid=GRID,
                   progress=False)
    straight = json.loads((root / "tuned.json").read_text())
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(resumed["candidates"]) == strip(straight["candidates"])


def test_reporting_judges_are_refused_by_name_and_by_weights(setup, monkeypatch):
    _, judge, _ = setup
    for name in REPORTING_JUDGES:
        impostor = type("J", (), {"name": name, "identity": "x", "device": torch.device("cpu")})()
        with pytest.raises(UserInputError, match="reporting judge"):
            check_tuning_judge(impostor)
    import cmboost.metrics.judges as judges

    monkeypatch.setattr(judges, "reporting_identities", lambda device="cpu": {judge.identity: "fmnist-allconv"})
    with pytest.raises(UserInputError, match="same weights as the reporting judge fmnist-allconv"):
        check_tuning_judge(judge)


def test_cli_tune_refuses_a_reporting_judge_and_a_test_reference(setup, tmp_path, capsys):
    root, _, _ = setup
    common = [str(root / "val.npz"), "--model", str(ASSETS / "jcd-joint.safetensors"), "--device", "cpu"]
    assert cli_main(["tune", *common, "--ref", str(root / "train-ref.npz"), "--judge", "effnet-lite0",
                     "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reporting judge" in err[0]
    assert cli_main(["tune", *common, "--ref", str(root / "test-ref.npz"), "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "test split" in err[0]
    assert not list(tmp_path.iterdir())


def test_boost_settings_uses_the_tuned_method_and_flags_override(setup, capsys):
    root, _, _ = setup
    tuned = json.loads((root / "tuned.json").read_text())
    model = str(ASSETS / "jcd-joint.safetensors")
    assert cli_main(["boost", str(root / "val.npz"), "--model", model, "--settings", str(root / "tuned.json"),
                     "--out", str(root / "b.npz"), "--dry-run", "--device", "cpu"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["method"] == tuned["best"]
    assert cli_main(["boost", str(root / "val.npz"), "--model", model, "--settings", str(root / "tuned.json"),
                     "--method", "pgd", "--steps", "7", "--out", str(root / "b.npz"), "--dry-run", "--device", "cpu"]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["hyper"]["eps"] == tuned["methods"]["pgd"]["hyper"]["eps"] and resolved["hyper"]["steps"] == 7
    (root / "bad.json").write_text("{}")
    assert cli_main(["boost", str(root / "val.npz"), "--model", model, "--settings", str(root / "bad.json"),
                     "--out", str(root / "b.npz"), "--device", "cpu"]) == 2
    assert "not a cmboost tune file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- boost --settings = tune's images

@pytest.fixture(scope="module")
def many(tmp_path_factory, setup):
    """More images than one compute block holds: 257, so that blocks of 250 and of 256 end differently
    (7 images and 1: on a CPU a batch of one takes other conv kernels). The last image is one whose
    PGD edit, here, turns that last-bit difference into other pixels."""
    _, judge, ref = setup
    root = tmp_path_factory.mktemp("tune-many")
    train, labels, _ = load_dataset("fmnist", "train", image_size=32)
    samples = to_uint8(gaussian_blur(to_float(train[1996:2253]), 1.0))
    save_samples(root / "val.npz", samples, labels[1996:2253])
    return root, judge, ref


@pytest.mark.parametrize("block", [None, 250], ids=["default-block", "block-250"])
def test_boost_settings_writes_the_images_tune_scored(many, monkeypatch, block):
    """tune's best candidate and `boost --settings` on the same file give the same bytes, with tune's
    default block and with the 250 of the shipped files (PGD turns a last-bit difference between two
    blocks into other pixels)."""
    root, judge, ref = many
    import cmboost.tune as tune_module
    from cmboost.runtime import BLOCK_SIZE
    from cmboost.samples import load_samples
    from cmboost.tune import TuneSettings, settings_block

    assert TuneSettings().batch_size == BLOCK_SIZE  # one default for the compute block
    scored = {}
    real_run = tune_module.run_method

    def spy(method, hyper, *args, **kwargs):
        result = real_run(method, hyper, *args, **kwargs)
        scored[json.dumps([method, hyper], sort_keys=True)] = result[0]
        return result

    monkeypatch.setattr(tune_module, "run_method", spy)
    grid = [("pgd", {"eps": 8.0, "steps": 15}), ("unsharp", {"amount": 1.0, "sigma": 1.0})]
    out = root / f"tuned-{block}.json"
    extra = {} if block is None else {"batch_size": block}
    settings = tune(root / "val.npz", load_joint_model(ASSETS / "jcd-joint.safetensors"), ref, judge, out,
                    grid=grid, progress=False, **extra)
    assert settings["best"] == "pgd"
    assert settings_block(tune_module.load_settings_file(out)) == (block or BLOCK_SIZE)
    best = settings["methods"]["pgd"]
    tune_images = scored[json.dumps(["pgd", best["hyper"]], sort_keys=True)]
    boosted = root / f"boosted-{block}.npz"
    assert cli_main(["boost", str(root / "val.npz"), "--model", str(ASSETS / "jcd-joint.safetensors"), "--settings",
                     str(out), "--out", str(boosted), "--device", "cpu", "--no-grid"]) == 0
    images, _ = load_samples(boosted)
    assert images.shape == tune_images.shape and images.tobytes() == tune_images.tobytes()


def test_settings_files_without_a_recorded_block_boost_with_tunes_old_block(capsys):
    """The shipped settings files were tuned with blocks of 250 before tune recorded its block."""
    from cmboost.tune import LEGACY_BLOCK, load_settings_file, settings_block

    assert LEGACY_BLOCK == 250
    shipped = load_settings_file(ASSETS / "tuned-ct1.json")
    assert "batch_size" not in shipped["fingerprint"] and settings_block(shipped) == LEGACY_BLOCK
    args = [str(ASSETS / "tuned-ct1.json"), "--out", "never.npz", "--dry-run", "--device", "cpu"]
    base = ["boost", "x.npz", "--model", str(ASSETS / "jcd-joint.safetensors"), "--settings"]
    assert cli_main(base + args) == 0
    assert json.loads(capsys.readouterr().out)["block_size"] == LEGACY_BLOCK
    assert cli_main(base + args + ["--block-size", "64"]) == 0  # given explicitly, the flag wins
    assert json.loads(capsys.readouterr().out)["block_size"] == 64
    from cmboost.runtime import BLOCK_SIZE

    assert cli_main(base[:-1] + args[1:]) == 0  # no settings file: the runtime's block
    assert json.loads(capsys.readouterr().out)["block_size"] == BLOCK_SIZE


def test_a_bad_recorded_block_is_one_line_naming_the_file(tmp_path, capsys):
    tuned = json.loads((ASSETS / "tuned-ct1.json").read_text())
    for bad in (0, 2.5, "250", True):
        tuned["fingerprint"]["batch_size"] = bad
        (tmp_path / "t.json").write_text(json.dumps(tuned))
        assert cli_main(["boost", "x.npz", "--model", str(ASSETS / "jcd-joint.safetensors"), "--settings",
                         str(tmp_path / "t.json"), "--out", str(tmp_path / "o.npz"), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "fingerprint.batch_size" in err and str(tmp_path / "t.json") in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json"]
