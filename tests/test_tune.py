"""`cmboost tune`: judges kept apart, the choice rule, resume, and `boost --settings`."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cmboost.boosting.controls import gaussian_blur
from cmboost.boosting.settings import BOOST_METHODS, load_settings_file
from cmboost.cli import main as cli_main
from cmboost.demo.assets import ASSETS
from cmboost.errors import UserInputError
from cmboost.files.datasets import load_dataset
from cmboost.files.samples import save_samples, to_float, to_uint8
from cmboost.jcd.model import build_joint_model, load_joint_model, save_joint_model
from cmboost.metrics.features import load_feature_extractor
from cmboost.metrics.judges import REPORTING_JUDGES, TUNING_JUDGE
from cmboost.metrics.reference import reference_stats, save_reference
from cmboost.metrics.separation import check_tuning_judge
from cmboost.tuning.candidates import TuneSettings
from cmboost.tuning.choose import ResolvedTune, run_tune


CHOICE_FIELDS = {f.name for f in dataclasses.fields(TuneSettings)}


def tune(samples, model, reference, judge, out, **fields):
    """run_tune, the function `cmboost tune` runs, on loaded objects: one judge and reference, or lists of
    them (a committee); TuneSettings' fields go into the choice, the rest into ResolvedTune."""
    judges = tuple(judge) if isinstance(judge, (list, tuple)) else (judge,)
    references = tuple(reference) if isinstance(reference, (list, tuple)) else (reference,)
    choice = TuneSettings(**{k: fields.pop(k) for k in list(fields) if k in CHOICE_FIELDS})
    grid = fields.pop("grid", None)
    return run_tune(ResolvedTune(samples=str(samples), out=str(out), model=model, judges=judges, references=references,
                                 grid=None if grid is None else tuple(grid), choice=choice, **fields))

LEGACY_SETTINGS = Path(__file__).resolve().parent / "data" / "legacy-tuned-ct1.json"

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
    assert not (root / "tuned.json.job").exists()
    with pytest.raises(UserInputError, match="exists"):
        tune(root / "val.npz", model, ref, judge, root / "tuned.json", grid=GRID[:1], progress=False)


def test_tune_resumes_after_an_interruption(setup, monkeypatch):
    root, judge, ref = setup
    model, classifier = models()
    import cmboost.tuning.choose as tune_module

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
    partial = json.loads((root / "resumed.json.job" / "rows.json").read_text())
    assert len(partial) == 3  # none + two candidates
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
    import cmboost.metrics.separation as separation

    monkeypatch.setattr(separation, "reporting_identities", lambda device="cpu": {judge.identity: "fmnist-allconv"})
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
    import cmboost.tuning.choose as tune_module
    from cmboost.boosting.settings import settings_block
    from cmboost.files.samples import load_samples
    from cmboost.runtime import BLOCK_SIZE
    from cmboost.tuning.candidates import TuneSettings

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
    assert settings_block(load_settings_file(out)) == (block or BLOCK_SIZE)
    best = settings["methods"]["pgd"]
    tune_images = scored[json.dumps(["pgd", best["hyper"]], sort_keys=True)]
    boosted = root / f"boosted-{block}.npz"
    assert cli_main(["boost", str(root / "val.npz"), "--model", str(ASSETS / "jcd-joint.safetensors"), "--settings",
                     str(out), "--out", str(boosted), "--device", "cpu", "--no-grid"]) == 0
    images, _ = load_samples(boosted)
    assert images.shape == tune_images.shape and images.tobytes() == tune_images.tobytes()


def test_settings_files_without_a_recorded_block_boost_with_tunes_old_block(capsys):
    """Settings files written before tune recorded its block (tests/data/legacy-tuned-ct1.json, the
    shipped file of that time) were tuned with blocks of 250; the shipped files now record theirs."""
    from cmboost.boosting.settings import LEGACY_BLOCK, load_settings_file, settings_block

    assert LEGACY_BLOCK == 250
    legacy = load_settings_file(LEGACY_SETTINGS)
    assert "batch_size" not in legacy["fingerprint"] and settings_block(legacy) == LEGACY_BLOCK
    shipped = load_settings_file(ASSETS / "tuned-ct1.json")
    assert settings_block(shipped) == shipped["fingerprint"]["batch_size"]
    args = [str(LEGACY_SETTINGS), "--out", "never.npz", "--dry-run", "--device", "cpu"]
    # the network the legacy file was tuned for (its fingerprint.model)
    base = ["boost", "x.npz", "--model", str(ASSETS / "jcd-joint-w24.safetensors"), "--settings"]
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


# ----------------------------------------------------------------------------- a committee of tuning judges

@pytest.fixture(scope="module")
def committee(setup, tmp_path_factory):
    """Three tuning judges with their training-data references: the shipped tuning judge, the shipped
    attacker net (no reporting judge) and a small untrained domain net of its own weights."""
    root, judge, ref = setup
    from cmboost.metrics.domain_net import DomainNet, DomainNetConfig, save_domain_net

    folder = tmp_path_factory.mktemp("committee")
    torch.manual_seed(5)
    tiny = DomainNet(DomainNetConfig(arch="allconv", widths=(4, 8, 8, 8), feature_dim=16, dropout=0.2))
    tiny_path = save_domain_net(folder / "tiny.safetensors", tiny)
    train, _, _ = load_dataset("fmnist", "train", image_size=32)
    judges, refs, ref_paths = [judge], [ref], [root / "train-ref.npz"]
    for spec in ("fmnist-attacker", str(tiny_path)):
        extractor = load_feature_extractor(spec, "cpu")
        judges.append(extractor)
        refs.append(reference_stats(train[:400], extractor, source="fmnist train"))
        ref_paths.append(save_reference(folder / f"ref-{len(refs)}.npz", refs[-1]))
    return root, folder, judges, refs, ref_paths


def _expected_choice(saved: dict, names: list[str], drop: float, radius=None, allow=False):
    """The committee's rule, recomputed from the recorded per-judge metrics."""
    base = saved["candidates"][0]["judges"]

    def assess(row):
        per = row["judges"]
        worst = max((per[n][c] - base[n][c]) / abs(base[n][c]) for n in names for c in ("fid", "kid"))
        kept = all(per[n]["recall"] >= base[n]["recall"] - drop for n in names)
        beyond = radius is not None and row["method"] in ("pgd", "bigroc") and row["hyper"]["eps"] > radius
        return (beyond and not allow, not kept, worst)

    best = {}
    for row in saved["candidates"][1:]:
        if row["method"] not in best or assess(row) < assess(best[row["method"]]):
            best[row["method"]] = row
    chosen = min((m for m in BOOST_METHODS if m in best), key=lambda m: assess(best[m]))
    return chosen, best, assess


def test_a_committee_chooses_the_best_worst_case_and_records_every_judge(committee):
    from scipy.stats import spearmanr

    from cmboost.boosting.settings import tuning_judges
    from cmboost.tuning.table import format_table

    root, folder, judges, refs, _ = committee
    model, classifier = models()
    names = [j.name for j in judges]
    settings = tune(root / "val.npz", model, refs, judges, folder / "committee.json", classifier=classifier,
                    grid=GRID, progress=False)
    saved = json.loads((folder / "committee.json").read_text())
    assert saved == json.loads(json.dumps(settings))
    assert saved["criterion"] == "fid+kid" and "worst relative change" in saved["rule"]
    assert [m["name"] for m in saved["committee"]] == names
    assert [m["identity"] for m in saved["committee"]] == [j.identity for j in judges]
    assert all(m["role"] == "tuning" and m["reference"]["data"] == "fmnist train" for m in saved["committee"])
    assert saved["judge"] == {"name": names[0], "identity": judges[0].identity, "role": "tuning"}
    assert tuning_judges(saved) == [{"name": j.name, "identity": j.identity, "role": "tuning"} for j in judges]
    for row in saved["candidates"]:
        assert set(row["judges"]) == set(names) and row["metrics"] == row["judges"][names[0]]
    chosen, best, assess = _expected_choice(saved, names, saved["max_recall_drop"])
    assert saved["choice"] == chosen  # on the choosing half; kept only if the other half confirms it
    assert saved["best"] == (chosen if all(j["confirmed"] for j in saved["decision"]["judges"].values()) else "none")
    for method, row in best.items():
        assert saved["methods"][method]["hyper"] == row["hyper"]
        assert saved["methods"][method]["worst"] == pytest.approx(assess(row)[2])
        assert saved["methods"][method]["recall_ok"] is (not assess(row)[1])
    # the lead judge's scores are the ones it gives alone
    alone = tune(root / "val.npz", model, refs[0], judges[0], folder / "alone.json", classifier=classifier,
                 grid=GRID, progress=False)
    assert [r["metrics"] for r in alone["candidates"]] == [r["metrics"] for r in saved["candidates"]]
    # ranking agreement: Spearman's rho of the candidates' FID per pair of judges
    agreement = saved["agreement"]
    assert agreement["candidates"] == len(GRID) and len(agreement["pairs"]) == 3
    for pair in agreement["pairs"]:
        a, b = ([r["judges"][n]["fid"] for r in saved["candidates"][1:]] for n in pair["judges"])
        assert pair["rho"] == pytest.approx(spearmanr(a, b)[0])
    for name in names:
        mine = [p["rho"] for p in agreement["pairs"] if name in p["judges"]]
        assert agreement["mean"][name] == pytest.approx(np.mean(mine))
    table = format_table(saved)
    assert "ranking agreement" in table and all(name in table for name in names)
    assert "(chosen" in table.splitlines()[5 + list(saved["methods"]).index(chosen)]
    assert "confirming half" in table and table.splitlines()[-1].startswith("answer: ")


def test_one_judge_keeps_the_settings_file_layout(setup):
    root, _, _ = setup
    shipped = json.loads(LEGACY_SETTINGS.read_text())  # a one-judge file from before committees
    mine = json.loads((root / "tuned.json").read_text())
    # the old layout, with the choosing half's winner and the confirmed answer after "best"
    assert list(mine) == list(shipped)[:2] + ["choice", "decision"] + list(shipped)[2:]
    from cmboost.boosting.settings import tuning_judges

    assert tuning_judges(shipped) == [shipped["judge"]]
    assert list(mine["fingerprint"]) == list(shipped["fingerprint"]) + ["batch_size", "halves"]
    timed = {"seconds"}  # the shipped rows' timings, dropped since so that every run writes the same bytes
    assert [sorted(r) for r in mine["candidates"]] == [sorted(set(shipped["candidates"][0]) - timed | {"confirm"})] * \
        len(mine["candidates"])
    assert {k: sorted(v) for k, v in mine["methods"].items()} == \
        {k: sorted(set(v) - timed | {"confirm", "confirm_change"}) for k, v in shipped["methods"].items()
         if k in mine["methods"]}


def test_candidates_beyond_the_robust_radius_are_marked_and_not_chosen(committee):
    from cmboost.tuning.table import format_table

    root, folder, judges, refs, _ = committee
    model, classifier = models()
    names = [j.name for j in judges[:2]]
    grid = [("pgd", {"eps": 1.0, "steps": 3}), ("pgd", {"eps": 3.0, "steps": 3}), ("bigroc", {"eps": 3.0, "steps": 3}),
            ("sgld", {"steps": 3, "step": 0.2})]
    runs = {}
    for allow in (False, True):
        runs[allow] = tune(root / "val.npz", model, refs[:2], judges[:2], folder / f"radius-{allow}.json",
                           classifier=classifier, grid=grid, progress=False, robust_radius=2.0,
                           allow_beyond_radius=allow)
        saved = json.loads((folder / f"radius-{allow}.json").read_text())
        assert saved["robust_radius"] == 2.0 and saved["allow_beyond_radius"] is allow
        assert [c["beyond_radius"] for c in saved["candidates"]] == [False, False, True, True, False]
        chosen, best, _ = _expected_choice(saved, names, saved["max_recall_drop"], 2.0, allow)
        assert saved["choice"] == chosen
        assert saved["methods"]["bigroc"]["beyond_radius"] is True  # still recorded, for boost --method bigroc
        if not allow:
            assert not saved["methods"][saved["choice"]]["beyond_radius"]
            assert saved["methods"]["pgd"]["hyper"]["eps"] == 1.0
        table = format_table(saved)
        assert "robust radius 2: 2 of 4 candidates edit beyond it" in table
        assert "eps beyond the robust radius 2.0" in table
    # the scores do not depend on the radius: only the marks and the choice do
    assert [r["judges"] for r in runs[False]["candidates"]] == [r["judges"] for r in runs[True]["candidates"]]
    # one judge: marked in the file and the table alike
    one = tune(root / "val.npz", model, refs[0], judges[0], folder / "radius-one.json", classifier=classifier,
               grid=grid, progress=False, robust_radius=2.0)
    assert one["best"] != "bigroc" and one["methods"]["pgd"]["hyper"]["eps"] == 1.0
    assert "edit beyond it" in format_table(one)
    with pytest.raises(UserInputError, match="--robust-radius 0.5: every boosting candidate"):
        tune(root / "val.npz", model, refs[0], judges[0], folder / "never.json", grid=grid[:2], progress=False,
             robust_radius=0.5)
    assert not (folder / "never.json").exists() and not (folder / "never.json.job").exists()


def test_a_committee_resumes_to_the_same_bytes_and_refuses_another_committees_progress(committee, monkeypatch):
    root, folder, judges, refs, _ = committee
    model, _ = models()
    import cmboost.tuning.choose as tune_module

    grid = GRID[:3]
    tune(root / "val.npz", model, refs[:2], judges[:2], folder / "straight.json", grid=grid, progress=False)
    real_run = tune_module.run_method
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(tune_module, "run_method", flaky)
    with pytest.raises(KeyboardInterrupt):
        tune(root / "val.npz", model, refs[:2], judges[:2], folder / "resumed.json", grid=grid, progress=False)
    monkeypatch.setattr(tune_module, "run_method", real_run)
    partial = folder / "resumed.json.job" / "rows.json"
    assert len(json.loads(partial.read_text())) == 2
    with pytest.raises(UserInputError, match="another configuration"):  # other judges cannot resume it
        tune(root / "val.npz", model, [refs[0], refs[2]], [judges[0], judges[2]], folder / "resumed.json",
             grid=grid, progress=False)
    with pytest.raises(UserInputError, match="another configuration"):  # nor one judge
        tune(root / "val.npz", model, refs[0], judges[0], folder / "resumed.json", grid=grid, progress=False)
    tune(root / "val.npz", model, refs[:2], judges[:2], folder / "resumed.json", grid=grid, progress=False)
    assert (folder / "resumed.json").read_bytes() == (folder / "straight.json").read_bytes()


def test_a_committee_of_the_same_judge_twice_or_with_a_reporting_judge_is_refused(committee):
    root, folder, judges, refs, _ = committee
    model, _ = models()
    with pytest.raises(UserInputError, match="named twice"):
        tune(root / "val.npz", model, [refs[0]] * 2, [judges[0]] * 2, folder / "x.json", grid=GRID[:1], progress=False)
    twin = type("J", (), {"name": "copy-of-fmnist", "identity": judges[0].identity, "device": torch.device("cpu")})()
    with pytest.raises(UserInputError, match="same weights as fmnist"):
        tune(root / "val.npz", model, [refs[0]] * 2, [judges[0], twin], folder / "x.json", grid=GRID[:1],
             progress=False)
    with pytest.raises(UserInputError, match="reporting judge"):
        tune(root / "val.npz", model, refs[:2], [judges[0], load_feature_extractor("fmnist-allconv", "cpu")],
             folder / "x.json", grid=GRID[:1], progress=False)
    with pytest.raises(UserInputError, match="need one reference each"):
        tune(root / "val.npz", model, refs[:1], judges[:2], folder / "x.json", grid=GRID[:1], progress=False)
    with pytest.raises(UserInputError, match="reference made with feature net"):  # references in another order
        tune(root / "val.npz", model, refs[1::-1], judges[:2], folder / "x.json", grid=GRID[:1], progress=False)
    assert not (folder / "x.json").exists() and not (folder / "x.json.job").exists()


def test_cli_tune_with_a_committee(committee, tmp_path, capsys):
    root, folder, judges, _, ref_paths = committee
    (tmp_path / "grid.json").write_text(json.dumps({"pgd": [{"eps": 1.0, "steps": 2}, {"eps": 3.0, "steps": 2}],
                                                    "sgld": [{"steps": 2, "step": 0.2}]}))
    (tmp_path / "pgd.json").write_text(json.dumps({"pgd": [{"eps": 1.0, "steps": 2}]}))
    spec = ",".join(j.name for j in judges)
    common = [str(root / "val.npz"), "--model", str(ASSETS / "jcd-joint.safetensors"), "--device", "cpu",
              "--grid", str(tmp_path / "grid.json"), "--no-progress", "--judge", spec]
    refs = [a for path in ref_paths for a in ("--ref", str(path))]
    out = tmp_path / "c.json"
    assert cli_main(["tune", *common, *refs, "--robust-radius", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "tuning committee of 3 judges" in printed and "ranking agreement" in printed
    assert "robust radius 2: 1 of 3 candidates edit beyond it" in printed
    saved = json.loads(out.read_text())
    assert [m["name"] for m in saved["committee"]] == spec.split(",")
    assert saved["provenance"]["reference"] == [str(p) for p in ref_paths]
    assert cli_main(["boost", str(root / "val.npz"), "--model", str(ASSETS / "jcd-joint.safetensors"), "--settings",
                     str(out), "--out", str(tmp_path / "b.npz"), "--dry-run", "--device", "cpu"]) == 0
    resolved = json.loads(capsys.readouterr().out)  # a committee's file boosts as any other
    assert resolved["method"] == saved["best"]
    if saved["best"] != "none":
        assert resolved["block_size"] == saved["fingerprint"]["batch_size"]
    # the references may also be given comma-separated, in the same order: the same file
    assert cli_main(["tune", *common, "--ref", ",".join(map(str, ref_paths)), "--robust-radius", "2",
                     "--out", str(tmp_path / "d.json")]) == 0
    capsys.readouterr()
    other = json.loads((tmp_path / "d.json").read_text())
    assert other["candidates"] == saved["candidates"] and other["best"] == saved["best"]
    # without --robust-radius, the radius the network was trained at (train-jcd --real-eps 0.5) is used
    (tmp_path / "small.json").write_text(json.dumps({"pgd": [{"eps": 1.0, "steps": 2}, {"eps": 3.0, "steps": 2}],
                                                     "sgld": [{"steps": 2, "step": 0.002}]}))
    small = ["--grid", str(tmp_path / "small.json")]  # SGLD's measured edit stays within the radius
    assert cli_main(["tune", *common, *refs, *small, "--out", str(tmp_path / "trained.json")]) == 0
    printed = capsys.readouterr().out
    trained = json.loads((tmp_path / "trained.json").read_text())
    assert "robust radius 0.5: 2 of 3 candidates edit beyond it" in printed, printed
    assert trained["robust_radius"] == 0.5 and trained["choice"] == "sgld"
    assert "train-jcd --real-eps" in trained["provenance"]["robust_radius_from"]
    # the grid's SGLD moves images further than 0.5: nothing within the radius is left to choose
    assert cli_main(["tune", *common, *refs, "--out", str(tmp_path / "none.json")]) == 2
    assert "every boosting candidate edits beyond it" in capsys.readouterr().err
    assert not (tmp_path / "none.json").exists() and (tmp_path / "none.json.job").exists()
    assert cli_main(["tune", *common, *refs, "--allow-beyond-radius", "--out", str(tmp_path / "none.json")]) == 0
    assert json.loads((tmp_path / "none.json").read_text())["methods"]["sgld"]["beyond_radius"] is True
    capsys.readouterr()
    plain = tmp_path / "plain.safetensors"  # a network that records no radius
    save_joint_model(build_joint_model("resnet_small", 10, 1, 32), plain)
    bad = [(["--ref", str(ref_paths[0])], "--ref"),
           ([*refs, "--judge", "fmnist,fmnist-resnet,fmnist-attacker"], "--judge fmnist-resnet"),
           ([*refs, "--judge", "fmnist,,fmnist-attacker"], "--judge"),
           ([*refs, "--allow-beyond-radius", "--model", str(plain)], "--allow-beyond-radius"),
           ([*refs, "--robust-radius", "0"], "--robust-radius"),
           ([*refs, "--robust-radius", "0.5", "--grid", str(tmp_path / "pgd.json")], "--robust-radius"),
           ([*refs, "--criterion", "worst"], "--criterion")]
    for extra, flag in bad:
        argv = ["tune", *common, *extra, "--out", str(tmp_path / "never.json")]
        with pytest.raises(SystemExit) if flag == "--criterion" else _no_raise():
            code = cli_main(argv)
            err = capsys.readouterr().err
            assert code == 2 and err.count("\n") == 1 and f"error: {flag}" in err, (extra, err)
        assert not (tmp_path / "never.json").exists() and not (tmp_path / "never.json.job").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_spearman_handles_ties_and_says_when_it_is_undefined():
    from scipy.stats import spearmanr

    from cmboost.tuning.choose import spearman

    a, b = [1.0, 2.0, 2.0, 5.0, 3.0], [2.0, 1.0, 4.0, 4.0, 9.0]
    assert spearman(a, b) == pytest.approx(spearmanr(a, b)[0])
    assert spearman([1.0, 2.0, 3.0], [30.0, 20.0, 10.0]) == pytest.approx(-1.0)
    assert spearman([1.0], [2.0]) is None and spearman([1.0, 1.0], [1.0, 2.0]) is None


def test_sgld_is_beyond_the_radius_by_its_measured_edit():
    from cmboost.tuning.candidates import beyond_radius

    assert beyond_radius("sgld", {"steps": 15, "step": 1.0}, 1.5, mean_l2_change=3.8)
    assert not beyond_radius("sgld", {"steps": 15, "step": 0.01}, 1.5, mean_l2_change=0.2)
    assert not beyond_radius("sgld", {"steps": 15, "step": 1.0}, 1.5)  # not yet scored: choosable
    assert beyond_radius("pgd", {"eps": 2.0}, 1.5) and not beyond_radius("pgd", {"eps": 1.5}, 1.5)
    assert not beyond_radius("unsharp", {"amount": 1.0, "sigma": 1.0}, 1.5, mean_l2_change=9.0)  # a control
    assert not beyond_radius("pgd", {"eps": 8.0}, None)


# ----------------------------------------------------------------------------- "do not boost"

ANSWER_GRID = [("pgd", {"eps": 1.0, "steps": 3}), ("pgd", {"eps": 3.0, "steps": 3}), ("sgld", {"steps": 3, "step": 0.2})]


@pytest.fixture(scope="module")
def answers(setup):
    """Tune on 200 real test images (no edit can improve them) and on 200 blurred training images (the
    joint network's PGD sharpens them): one answer each, under the tuning judge and training statistics."""
    root, judge, ref = setup
    test, test_labels, _ = load_dataset("fmnist", "test", image_size=32)
    train, labels, _ = load_dataset("fmnist", "train", image_size=32)
    save_samples(root / "real-test.npz", test[:200], test_labels[:200])
    save_samples(root / "blurred.npz", to_uint8(gaussian_blur(to_float(train[2000:2200]), 1.0)), labels[2000:2200])
    model = load_joint_model(ASSETS / "jcd-joint.safetensors")
    return {name: tune(root / f"{name}.npz", model, ref, judge, root / f"answer-{name}.json", grid=ANSWER_GRID,
                       progress=False) for name in ("real-test", "blurred")}


def test_real_images_get_do_not_boost_with_the_reason_and_both_halves_numbers(answers, setup):
    from cmboost.tuning.table import format_table

    root, _, _ = setup
    real = json.loads((root / "answer-real-test.json").read_text())
    assert real == json.loads(json.dumps(answers["real-test"]))
    assert real["best"] == "none" and real["choice"] in ("pgd", "sgld")
    decision = real["decision"]
    assert decision["candidate"]["method"] == real["choice"] and "not confirmed" in decision["reason"]
    assert not all(j["confirmed"] for j in decision["judges"].values())
    for row in real["candidates"]:  # both halves' numbers, for every candidate
        assert set(row["confirm"]["metrics"]) == set(row["metrics"]) and row["confirm"]["metrics"] != row["metrics"]
    for best in real["methods"].values():
        change = best["confirm_change"][TUNING_JUDGE]["fid"]
        assert change["std"] > 0 and change["beyond_noise"] is (change["change"] < -2 * change["std"])
    table = format_table(real)
    assert "confirming half" in table and table.splitlines()[-1].startswith("answer: do not boost")


def test_a_gain_beyond_the_noise_is_chosen_and_confirmed(answers):
    blurred = answers["blurred"]
    assert blurred["best"] == blurred["choice"] == "pgd"
    judge = blurred["decision"]["judges"][TUNING_JUDGE]
    assert judge["confirmed"] and judge["recall_kept"]
    for metric in ("fid", "kid"):
        assert judge[metric]["change"] < -2 * judge[metric]["std"] < 0


def test_boost_with_a_do_not_boost_file_writes_the_images_unchanged(answers, setup, tmp_path, capsys):
    from cmboost import api
    from cmboost.files.samples import load_samples

    root, _, _ = setup
    settings, samples = root / "answer-real-test.json", root / "real-test.npz"
    model = str(ASSETS / "jcd-joint.safetensors")
    out = tmp_path / "boosted.npz"
    assert cli_main(["boost", str(samples), "--model", model, "--settings", str(settings), "--out", str(out),
                     "--device", "cpu"]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "chose not to boost" in line]
    assert len(said) == 1 and str(out) in said[0]
    (images, labels), (again, again_labels) = load_samples(samples), load_samples(out)
    assert again.tobytes() == images.tobytes() and again_labels.tobytes() == labels.tobytes()
    assert cli_main(["boost", str(samples), "--model", model, "--settings", str(settings), "--out",
                     str(tmp_path / "dry.npz"), "--dry-run", "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "none" and not (tmp_path / "dry.npz").exists()
    returned, returned_labels = api.boost((images, labels), model, settings=str(settings), device="cpu")
    assert returned.tobytes() == images.tobytes() and returned_labels.tobytes() == labels.tobytes()
    # naming a method uses its tuned settings all the same
    assert cli_main(["boost", str(samples), "--model", model, "--settings", str(settings), "--method", "pgd",
                     "--out", str(tmp_path / "pgd.npz"), "--device", "cpu", "--no-grid"]) == 0
    assert load_samples(tmp_path / "pgd.npz")[0].tobytes() != images.tobytes()
