"""Malformed input, one row per class: exit 2, one stderr line naming the file or flag, nothing written.

The classes come from a corpus run against the CLI: valid inputs refused, tracebacks where one line
belongs, the wrong culprit named, bad values accepted, debris left behind. Each row builds its own
input (none of it can be downloaded here) and asserts the same three things.
"""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import cmboost
from cmboost.cli import main as cli_main
from cmboost.jcd.model import load_joint_model, save_joint_model
from cmboost.files.samples import load_samples, save_samples

ASSETS = Path(cmboost.__file__).parent / "assets" / "fmnist"
JCD = ASSETS / "jcd-joint-w24.safetensors"
CM = ASSETS / "cd.safetensors"


def _npy_bytes(shape, dtype="|u1", payload=b"\0" * 64):
    """An .npy stream whose header declares `shape`, followed by `payload` (usually far too short)."""
    header = repr({"descr": dtype, "fortran_order": False, "shape": tuple(shape)}).encode()
    header += b" " * (63 - (10 + len(header)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header + payload


def _forged_npz(path, members, compress=zipfile.ZIP_DEFLATED):
    with zipfile.ZipFile(path, "w", compression=compress) as archive:
        for name, data in members.items():
            archive.writestr(f"{name}.npy", data)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 1, 32, 32), dtype=np.uint8)
    labels = np.arange(8) % 10
    save_samples(d / "good.npz", images, labels)
    nhwc = images.transpose(0, 2, 3, 1)
    np.savez(d / "fortran.npz", arr_0=np.asfortranarray(nhwc), arr_1=labels)
    np.savez(d / "empty.npz", arr_0=np.zeros((0, 32, 32, 1), np.uint8), arr_1=np.zeros(0, np.int64))
    _forged_npz(d / "huge.npz", {"arr_0": _npy_bytes((10**9, 32, 32, 1))})
    _forged_npz(d / "huge_labels.npz", {"arr_0": _npy_bytes((8, 32, 32, 1), payload=nhwc.tobytes()),
                                        "arr_1": _npy_bytes((10**10,), "<i8")})
    (d / "empty.pt").write_bytes(b"")
    model = load_joint_model(JCD)
    with torch.no_grad():
        next(iter(model.parameters())).view(-1)[0] = float("nan")
    save_joint_model(model, d / "nan.safetensors")
    sigma = np.eye(256)
    sigma[3, 3] = np.nan
    np.savez(d / "nan_ref.npz", mu=np.zeros(256), sigma=sigma)
    (d / "a_file").write_text("not a folder")
    (d / "empty-folder").mkdir()
    _grid_and_settings_files(d)
    _broken_references(d)
    return d


GRIDS = {"grid-empty": {}, "grid-empty-list": {"pgd": []}, "grid-controls-only": {"unsharp": [{"amount": 1.0}]},
         "grid-string-eps": {"pgd": [{"eps": 1.0}, {"eps": "big"}]}, "grid-negative-eps": {"pgd": [{"eps": -1.0}]},
         "grid-nan-eps": {"sgld": [{"step": 0.1}], "pgd": [{"eps": float("nan")}]},
         "grid-unknown-method": {"zap": [{}]}, "grid-bigroc": {"pgd": [{"eps": 1.0}], "bigroc": [{"eps": 1.0}]},
         "grid-a-list": [["pgd", {"eps": 1.0}]], "grid-other-format": {"format": "cmboost.grid/9", "pgd": [{}]}}


def _grid_and_settings_files(d):
    for name, grid in GRIDS.items():
        (d / f"{name}.json").write_text(json.dumps(grid))
    tuned = json.loads((ASSETS / "tuned-cd1.json").read_text())
    broken = {"no-best": lambda t: t.pop("best"), "no-hyper": lambda t: t["methods"]["pgd"].pop("hyper"),
              "methods-list": lambda t: t.update(methods=list(t["methods"].values())),
              "string-eps": lambda t: t["methods"]["pgd"]["hyper"].update(eps="3.0"),
              "negative-eps": lambda t: t["methods"]["pgd"]["hyper"].update(eps=-1.0)}
    for name, edit in broken.items():
        copy = json.loads(json.dumps(tuned))
        edit(copy)
        (d / f"settings-{name}.json").write_text(json.dumps(copy))


def _broken_references(d):
    import pickle

    rng = np.random.default_rng(1)
    features = rng.normal(size=(40, 256)).astype(np.float32)
    mu, sigma = features.mean(0).astype(np.float64), np.cov(features, rowvar=False)
    with open(d / "strings.pkl", "wb") as fh:
        pickle.dump({"mu": np.array(["a"] * 256), "sigma": sigma, "feature_net": "x"}, fh)
    np.savez(d / "count-text.npz", mu=mu, sigma=sigma, count=np.array("many"))
    negative = sigma.copy()
    negative[0, 0] = -5.0
    np.savez(d / "negative-eigenvalue.npz", mu=mu, sigma=negative)
    nan_features = features.copy()
    nan_features[7, 3] = np.nan
    np.savez(d / "nan-features.npz", mu=mu, sigma=sigma, features=nan_features)


def _run(capsys, argv):
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as done:  # argparse's own refusals exit from parse_args, as the console script does
        code = done.code
    err = capsys.readouterr().err.strip()
    return code, err


# (id, argv built from the inputs folder d and the output path out, text the one line must contain)
ROWS = [
    ("boost-0-images", lambda d, out: ["boost", d / "empty.npz", "--model", JCD, "--out", out], "empty.npz"),
    ("boost-huge-header", lambda d, out: ["boost", d / "huge.npz", "--model", JCD, "--out", out], "huge.npz"),
    ("convert-huge-header", lambda d, out: ["convert", d / "huge.npz", "--out", out], "huge.npz"),
    ("convert-huge-labels", lambda d, out: ["convert", d / "huge_labels.npz", "--out", out], "huge_labels.npz"),
    ("evaluate-huge-header", lambda d, out: ["evaluate", d / "huge.npz", "--ref", d / "nan_ref.npz",
                                             "--json", out], "huge.npz"),
    ("train-jcd-huge-generated", lambda d, out: ["train-jcd", "--data", "fmnist", "--generated", d / "huge.npz",
                                                 "--arch", "resnet_small", "--iters", "1", "--run-dir", out],
     "huge.npz"),
    ("boost-empty-pt", lambda d, out: ["boost", d / "good.npz", "--model", d / "empty.pt", "--out", out], "empty.pt"),
    ("evaluate-nan-sigma", lambda d, out: ["evaluate", d / "good.npz", "--ref", d / "nan_ref.npz", "--json", out],
     "nan_ref.npz"),
    ("boost-batch-size-0", lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--out", out,
                                           "--batch-size", "0"], "--batch-size"),
    ("boost-batch-size-negative", lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--out", out,
                                                  "--batch-size", "-3"], "--batch-size"),
    ("sample-batch-size-0", lambda d, out: ["sample", "--model", CM, "--num", "4", "--out", out,
                                            "--batch-size", "0"], "--batch-size"),
    ("boost-nan-weights", lambda d, out: ["boost", d / "good.npz", "--model", d / "nan.safetensors", "--out", out],
     "nan.safetensors"),
    ("boost-eps-nan", lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--out", out, "--eps", "nan"], "--eps"),
    ("boost-eps-inf", lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--out", out, "--eps", "inf"], "--eps"),
    ("boost-sgld-step-nan", lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--out", out,
                                            "--method", "sgld", "--sgld-step", "nan"], "--sgld-step"),
    ("boost-step-size-negative", lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--out", out,
                                                 "--step-size", "-1"], "--step-size"),
    # a reference that is not a zip: numpy would call it a pickle and suggest allow_pickle=True
    ("evaluate-ref-not-a-zip", lambda d, out: ["evaluate", d / "good.npz", "--ref", d / "a_file", "--json", out],
     "a_file: not an .npz (zip) archive"),
    # flags argparse itself cannot read: one line as well, not a usage block
    ("boost-eps-not-a-number", lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--out", out,
                                               "--eps", "abc"], "--eps"),
    ("boost-model-missing", lambda d, out: ["boost", d / "good.npz", "--out", out], "--model"),
    ("sample-kind-unknown", lambda d, out: ["sample", "--model", CM, "--num", "4", "--out", out,
                                            "--kind", "zz"], "--kind"),
    # seeds outside [0, 2^63) are refused by every verb, as train-jcd always did
    ("sample-seed-negative", lambda d, out: ["sample", "--model", CM, "--num", "4", "--out", out,
                                             "--seed", "-1"], "--seed"),
    ("sample-seed-2^63", lambda d, out: ["sample", "--model", CM, "--num", "4", "--out", out,
                                         "--seed", str(2 ** 63)], "--seed"),
    ("boost-sgld-seed-negative", lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--out", out,
                                                 "--method", "sgld", "--seed", "-5"], "--seed"),
    ("evaluate-ref-seed-negative", lambda d, out: ["evaluate-ref", "--data", "fmnist", "--split", "test",
                                                   "--seed", "-1", "--out", out], "--seed"),
    # D(x, y) lies in (0, 1): a threshold outside it is no early stop
    ("boost-threshold-negative", lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--out", out,
                                                 "--threshold", "-1"], "--threshold"),
    ("boost-threshold-above-1", lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--out", out,
                                                "--threshold", "1.5"], "--threshold"),
    # a --data-dir that names nothing is an error, never a silent fall-back to the system copy
    ("export-data-data-dir-missing", lambda d, out: ["export-data", "--data", "fmnist", "--stop", "4",
                                                     "--data-dir", d / "no-such-folder", "--out", out], "--data-dir"),
    ("export-data-data-dir-empty-folder", lambda d, out: ["export-data", "--data", "fmnist", "--stop", "4",
                                                          "--data-dir", d / "empty-folder", "--out", out],
     "--data-dir"),
    # tune --grid: one line naming the file and the key, before anything is loaded or scored
    *[(f"tune-{name}", (lambda name: lambda d, out: ["tune", d / "good.npz", "--model", JCD, "--ref", d / "ref.npz",
                                                     "--grid", d / f"{name}.json", "--out", out])(name), must)
      for name, must in (("grid-empty", "grid-empty.json: holds no candidates"),
                         ("grid-empty-list", "grid-empty-list.json: pgd: an empty list"),
                         ("grid-controls-only", "grid-controls-only.json: holds only controls"),
                         ("grid-string-eps", 'grid-string-eps.json: pgd[1]: eps "big"'),
                         ("grid-negative-eps", "grid-negative-eps.json: pgd[0]: eps -1.0: must be > 0"),
                         ("grid-nan-eps", "grid-nan-eps.json: pgd[0]: eps NaN: must be a finite number"),
                         ("grid-unknown-method", 'grid-unknown-method.json: method "zap"'),
                         ("grid-bigroc", "grid-bigroc.json: bigroc candidates need a robust classifier: pass "
                                         "--classifier"),
                         ("grid-a-list", "grid-a-list.json: expected a JSON object"),
                         ("grid-other-format", 'grid-other-format.json: format "cmboost.grid/9"'))],
    # boost --settings: the file and the key, not a flag
    *[(f"boost-settings-{name}", (lambda name: lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--settings",
                                                               d / f"settings-{name}.json", "--out", out])(name), must)
      for name, must in (("no-best", "settings-no-best.json: best (missing)"),
                         ("no-hyper", "settings-no-hyper.json: methods.pgd.hyper: expected an object"),
                         ("methods-list", "settings-methods-list.json: methods: expected an object"),
                         ("string-eps", 'settings-string-eps.json: methods.pgd.hyper: eps "3.0": must be a number'),
                         ("negative-eps", "settings-negative-eps.json: methods.pgd.hyper: eps -1.0: must be > 0"))],
    # references: the file and what is wrong with it, before any feature is computed
    ("evaluate-pkl-mu-strings", lambda d, out: ["evaluate", d / "good.npz", "--ref", d / "strings.pkl",
                                                "--json", out], "strings.pkl: mu holds <U1 values, not numbers"),
    ("evaluate-count-text", lambda d, out: ["evaluate", d / "good.npz", "--ref", d / "count-text.npz",
                                            "--json", out], "count-text.npz: count must be one whole number"),
    ("evaluate-negative-eigenvalue", lambda d, out: ["evaluate", d / "good.npz", "--ref", d / "negative-eigenvalue.npz",
                                                     "--json", out], "negative-eigenvalue.npz (mu, sigma): sigma"),
    ("evaluate-nan-features", lambda d, out: ["evaluate", d / "good.npz", "--ref", d / "nan-features.npz",
                                              "--json", out], "nan-features.npz: features hold NaN"),
    ("evaluate-nan-features-no-json", lambda d, out: ["evaluate", d / "good.npz", "--ref", d / "nan-features.npz"],
     "nan-features.npz: features hold NaN"),
    # sizes that could never be allocated are refused before anything is allocated
    ("export-data-image-size-huge", lambda d, out: ["export-data", "--data", "fmnist", "--image-size", "100000",
                                                    "--out", out], "--image-size 100000"),
    ("sample-num-huge", lambda d, out: ["sample", "--model", CM, "--num", "10000000000", "--out", out],
     "--num 10000000000"),
    # a wrong --teacher is refused before the run folder exists
    ("train-cm-teacher-not-edm", lambda d, out: ["train-cm", "--mode", "cd", "--teacher", CM, "--iters", "1",
                                                 "--run-dir", out, "--device", "cpu"], "--teacher"),
    ("train-jcd-data-dir-missing", lambda d, out: ["train-jcd", "--data", "fmnist", "--data-dir", d / "no-such-folder",
                                                   "--objective", "ce",
                                                   "--arch", "resnet_small", "--iters", "1", "--run-dir", out],
     "--data-dir"),
]

# Outputs whose parent is a file: every verb that writes.
PARENT_IS_FILE = [
    ("boost", lambda d, out: ["boost", d / "good.npz", "--model", JCD, "--out", out]),
    ("sample", lambda d, out: ["sample", "--model", CM, "--num", "4", "--out", out]),
    ("convert", lambda d, out: ["convert", d / "good.npz", "--out", out]),
    ("export-data", lambda d, out: ["export-data", "--data", "fmnist", "--stop", "4", "--out", out]),
    ("evaluate-json", lambda d, out: ["evaluate", d / "good.npz", "--ref", d / "good.npz", "--json", out]),
    ("train-jcd-run-dir", lambda d, out: ["train-jcd", "--data", "fmnist", "--arch", "resnet_small", "--iters", "1",
                                          "--objective", "ce", "--real-limit", "64", "--run-dir", out]),
]


def _assert_clean_refusal(code, err, must_name, out):
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert must_name in err, err
    assert "Traceback" not in err
    out = Path(out)
    assert not out.exists() and not out.with_name(out.name + ".job").exists()


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_one_line_and_leaves_nothing(row, files, tmp_path, capsys):
    _, argv, must_name = row
    out = tmp_path / "out.npz"
    code, err = _run(capsys, argv(files, out))
    _assert_clean_refusal(code, err, must_name, out)


@pytest.mark.parametrize("row", PARENT_IS_FILE, ids=[r[0] for r in PARENT_IS_FILE])
def test_an_output_under_a_file_is_one_line_before_any_work(row, files, capsys):
    _, argv = row
    out = files / "a_file" / "out.npz"
    code, err = _run(capsys, argv(files, out))
    _assert_clean_refusal(code, err, str(out), out)


def test_a_fortran_order_sample_file_is_valid(files, tmp_path, capsys):
    """NHWC saved in Fortran order (np.asfortranarray) is the same images: boost (memory-mapped
    reading) and convert take it and give the same bytes as from the C-order file."""
    for name in ("fortran", "good"):
        argv = ["boost", files / f"{name}.npz", "--model", JCD, "--steps", "2", "--no-grid",
                "--out", tmp_path / f"{name}-boosted.npz"]
        assert _run(capsys, argv)[0] == 0
    assert (tmp_path / "fortran-boosted.npz").read_bytes() == (tmp_path / "good-boosted.npz").read_bytes()
    assert _run(capsys, ["convert", files / "fortran.npz", "--out", tmp_path / "copy.npz"])[0] == 0
    np.testing.assert_array_equal(load_samples(tmp_path / "copy.npz")[0], load_samples(files / "good.npz")[0])


def test_too_few_images_for_the_feature_dimension_warn_in_one_line(files, tmp_path, capsys):
    from cmboost.files.datasets import fashion_mnist
    from cmboost.metrics.features import load_feature_extractor
    from cmboost.metrics.reference import reference_stats, save_reference

    real = fashion_mnist("test")[0][:400, None]
    ref = save_reference(tmp_path / "ref.npz", reference_stats(real, load_feature_extractor("fmnist", "cpu"),
                                                               num_features=300, source="fmnist test"))
    code, err = _run(capsys, ["evaluate", files / "good.npz", "--ref", ref, "--quiet"])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "8 images for 256-d features" in warnings[0] and "rank-deficient" in warnings[0]


def test_ctrl_c_while_the_cli_starts_is_one_line_and_exit_130(monkeypatch, capsys):
    import cmboost.cli as cli

    def interrupted():  # Ctrl-C lands while build_parser imports torch
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["boost", "--help"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "cmboost: interrupted\n" and captured.out == ""


def test_distinct_seeds_give_distinct_streams_and_seeds_below_2_32_keep_theirs():
    """The seed was masked to 32 bits, so --seed 0 and --seed 2^32 drew the same samples. Seeds below
    2^32 keep today's streams (the committed numbers stay valid); larger ones differ from all of them."""
    from cmboost.runtime import sample_seed

    for seed in (0, 7, 2 ** 32 - 1):  # today's derivation, written out
        state = np.random.SeedSequence([seed, 3]).generate_state(2, np.uint32)
        assert sample_seed(seed, 3) == ((int(state[0]) << 31) ^ int(state[1])) & (2 ** 63 - 1)
    seeds = [0, 1, 2 ** 32, 2 ** 32 + 1, 2 ** 33, 2 ** 62, 2 ** 63 - 1]
    streams = {tuple(sample_seed(seed, i) for i in range(4)) for seed in seeds}
    assert len(streams) == len(seeds)


def test_sample_seed_0_and_2_32_give_different_samples(tmp_path, capsys):
    for seed in (0, 2 ** 32):
        argv = ["sample", "--model", CM, "--num", "2", "--seed", seed, "--no-progress", "--out", tmp_path / f"{seed}.npz"]
        assert _run(capsys, argv)[0] == 0
    assert not np.array_equal(load_samples(tmp_path / "0.npz")[0], load_samples(tmp_path / f"{2 ** 32}.npz")[0])


def _tiny_jcd(run_dir, *extra):
    return ["train-jcd", "--data", "fmnist", "--arch", "resnet_small", "--width", "4", "--objective", "ce",
            "--iters", "6", "--batch-size", "8", "--real-limit", "64", "--real-steps", "1", "--log-every", "2",
            "--ckpt-every", "1", "--device", "cpu", "--run-dir", run_dir, *extra]


def _strict_json_lines(path):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()] if path.exists() else []


def test_train_jcd_stops_at_a_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    from cmboost.files.checkpoints import read_safetensors

    run_dir = tmp_path / "run"
    code, err = _run(capsys, _tiny_jcd(run_dir, "--lr", "1e30"))
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "--run-dir" in err and "last good checkpoint" in err and "--lr" in err
    assert not (run_dir / "model.safetensors").exists()
    tensors, _ = read_safetensors(run_dir / "state.safetensors")
    assert all(torch.isfinite(t).all() for k, t in tensors.items() if k.startswith("model.") and t.is_floating_point())
    _strict_json_lines(run_dir / "log.jsonl")  # valid JSON: no NaN


def test_train_cm_stops_at_a_non_finite_loss_and_keeps_the_last_good_state(tmp_path, capsys):
    from cmboost.files.checkpoints import read_safetensors

    run_dir = tmp_path / "run"
    code, err = _run(capsys, ["train-cm", "--mode", "edm", "--iters", "4", "--run-dir", run_dir, "--device", "cpu",
                              "--lr", "1e30", "--batch-size", "4", "--model-channels", "8", "--channel-mult", "1",
                              "--attention-resolutions", "4", "--num-head-channels", "8", "--save-every", "1",
                              "--log-every", "1", "--no-progress"])
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "last good state" in err
    tensors, _ = read_safetensors(run_dir / "state.safetensors")
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())
    assert all(np.isfinite(r["loss"]) for r in _strict_json_lines(run_dir / "log.jsonl"))


@pytest.fixture(scope="module")
def tuning(tmp_path_factory):
    """Validation samples and a training-data reference of the tuning judge, as small as tune takes."""
    from cmboost.files.datasets import load_dataset
    from cmboost.metrics.features import load_feature_extractor
    from cmboost.metrics.judges import TUNING_JUDGE
    from cmboost.metrics.reference import reference_stats, save_reference

    d = tmp_path_factory.mktemp("tuning")
    train, labels, _ = load_dataset("fmnist", "train", image_size=32)
    save_samples(d / "val.npz", train[2000:2016], labels[2000:2016])  # tune's least: 8 per half
    judge = load_feature_extractor(TUNING_JUDGE, "cpu")
    save_reference(d / "ref.npz", reference_stats(train[:64], judge, source="fmnist train"))
    (d / "grid.json").write_text(json.dumps({"format": "cmboost.grid/1", "pgd": [{"eps": 0.5, "steps": 1}],
                                             "unsharp": [{"amount": 0.5, "sigma": 1.0}]}))
    return d


def _tune_argv(d, out):
    return ["tune", d / "val.npz", "--model", JCD, "--ref", d / "ref.npz", "--grid", d / "grid.json",
            "--device", "cpu", "--no-progress", "--out", out]


@pytest.mark.parametrize("rows", [{"none": []}, {"none": {"method": "none"}}], ids=["row-a-list", "no-metrics"])
def test_a_malformed_tune_job_is_one_line_naming_it(tuning, tmp_path, capsys, rows):
    out = tmp_path / "tuned.json"
    job = tmp_path / "tuned.json.job"  # a job of the same configuration (recorded by a killed run) ...
    with pytest.MonkeyPatch.context() as m:
        import cmboost.tuning.choose as tune_module

        m.setattr(tune_module, "run_method", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        assert _run(capsys, _tune_argv(tuning, out))[0] == 130
    (job / "rows.json").write_text(json.dumps(rows))  # ... whose cached rows were damaged by hand
    code, err = _run(capsys, _tune_argv(tuning, out))
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(job / "rows.json") in err and f"delete {job} to start over" in err
    assert not out.exists()


def test_tune_writes_the_same_bytes_on_every_run_and_after_a_kill(tuning, tmp_path, capsys, monkeypatch):
    """The settings file holds no timings: two runs, and a run killed after its first candidate then
    rerun, write byte-identical files."""
    import cmboost.tuning.choose as tune_module

    for name in ("a.json", "b.json"):
        assert _run(capsys, _tune_argv(tuning, tmp_path / name))[0] == 0
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    real = tune_module.run_method

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after the unboosted row was scored and saved

    monkeypatch.setattr(tune_module, "run_method", killed)
    assert _run(capsys, _tune_argv(tuning, tmp_path / "c.json"))[0] == 130
    assert (tmp_path / "c.json.job" / "rows.json").exists()
    monkeypatch.setattr(tune_module, "run_method", real)
    assert _run(capsys, _tune_argv(tuning, tmp_path / "c.json"))[0] == 0
    assert (tmp_path / "c.json").read_bytes() == (tmp_path / "a.json").read_bytes()


def test_ctrl_c_while_the_console_script_imports_numpy_and_torch_is_one_line_and_exit_130(tmp_path):
    """The console script runs `from cmboost.cli import main; sys.exit(main())`. Ctrl-C lands while
    numpy (then torch) is imported, deterministically: an import hook raises KeyboardInterrupt there,
    as the signal would. That import must happen under main's handler, not at `cmboost.cli`'s import."""
    import subprocess
    import sys

    for heavy in ("numpy", "torch"):
        script = ("import builtins, sys\n"
                  "real = builtins.__import__\n"
                  "def hook(name, *args, **kwargs):\n"
                  f"    if name == {heavy!r}:\n"
                  "        builtins.__import__ = real\n"
                  "        raise KeyboardInterrupt\n"
                  "    return real(name, *args, **kwargs)\n"
                  "builtins.__import__ = hook\n"
                  "sys.argv = ['cmboost', 'info']\n"
                  "from cmboost.cli import main\n"
                  "sys.exit(main())\n")
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                              timeout=120)
        assert done.returncode == 130 and done.stderr == "cmboost: interrupted\n", (heavy, done.stderr[-2000:])


# An existing folder (or file) where a verb writes a file (or its parts folder): refused before any work.
FOLDER_IN_THE_WAY = [
    ("boost-out", lambda d, w: ["boost", d / "good.npz", "--model", JCD, "--out", w / "x.npz"], "x.npz"),
    ("boost-grid", lambda d, w: ["boost", d / "good.npz", "--model", JCD, "--out", w / "y.npz"], "y.grid.png"),
    ("sample-out", lambda d, w: ["sample", "--model", CM, "--num", "2", "--out", w / "x.npz"], "x.npz"),
    ("sample-parts-a-file", lambda d, w: ["sample", "--model", CM, "--num", "2", "--out", w / "z.npz"],
     "z.npz.job"),
    ("train-features-out", lambda d, w: ["train-features", "--data", "fmnist", "--epochs", "1", "--limit", "16",
                                         "--out", w / "net.safetensors"], "net.safetensors"),
    ("tune-out", lambda d, w: ["tune", d / "good.npz", "--model", JCD, "--ref", d / "good.npz", "--out",
                               w / "tuned.json"], "tuned.json"),
    ("evaluate-json", lambda d, w: ["evaluate", d / "good.npz", "--ref", d / "good.npz", "--json", w / "r.json"],
     "r.json"),
]


@pytest.mark.parametrize("row", FOLDER_IN_THE_WAY, ids=[r[0] for r in FOLDER_IN_THE_WAY])
def test_a_folder_where_a_file_goes_is_refused_before_any_work(row, files, tmp_path, capsys):
    _, argv, must_name = row
    way = tmp_path / "w"
    for folder in ("x.npz", "y.grid.png", "net.safetensors", "tuned.json", "r.json"):
        (way / folder).mkdir(parents=True)
        (way / folder / "keep.txt").write_text("mine")
    (way / "z.npz.job").write_text("mine")
    before = sorted(p.relative_to(way) for p in way.rglob("*"))
    for overwrite in ([], ["--overwrite"]):  # a file never replaces a folder, even when asked to overwrite
        code, err = _run(capsys, argv(files, way) + overwrite)
        assert code == 2 and len(err.splitlines()) == 1 and must_name in err and "Traceback" not in err, err
        assert sorted(p.relative_to(way) for p in way.rglob("*")) == before


def test_a_classifier_with_other_classes_is_named_not_the_samples(tuning, tmp_path, capsys):
    from cmboost.jcd.model import build_joint_model

    five = tmp_path / "five.safetensors"
    save_joint_model(build_joint_model("resnet_small", 5, 1, 32, width=4), five)
    argv = _tune_argv(tuning, tmp_path / "t.json")[:-2] + ["--classifier", five, "--out", tmp_path / "t.json"]
    code, err = _run(capsys, argv)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--classifier {five}: the classifier has 5 classes" in err and "val.npz" not in err
    assert not any(tmp_path.glob("t.json*"))


def test_a_palette_png_folder_reads_as_the_colours_it_shows(tmp_path, capsys):
    """Palette PNGs (as image optimisers write them) are converted to the folder's channel mode: the
    grey or RGB values they show, never their palette indices."""
    from PIL import Image

    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
    palette_of = {"grey": lambda v: (255 - v, 255 - v, 255 - v), "colour": lambda v: (v, 255 - v, v // 2)}
    for name, colour in palette_of.items():
        folder = tmp_path / name
        folder.mkdir()
        for i, image in enumerate(grey):  # index v shows colour(v): the indices are not the pixels
            im = Image.fromarray(image, mode="P")
            im.putpalette([c for v in range(256) for c in colour(v)])
            im.save(folder / f"{i:06d}.png")
    images, _ = load_samples(tmp_path / "grey")
    np.testing.assert_array_equal(images, 255 - grey[:, None])
    images, _ = load_samples(tmp_path / "colour")
    expected = np.stack([grey, 255 - grey, grey // 2], axis=1)
    np.testing.assert_array_equal(images, expected)
    # a palette PNG among grey ones takes the folder's grey mode
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(grey[0]).save(mixed / "000000.png")
    im = Image.fromarray(grey[1], mode="P")
    im.putpalette([c for v in range(256) for c in palette_of["grey"](v)])
    im.save(mixed / "000001.png")
    images, _ = load_samples(mixed)
    np.testing.assert_array_equal(images, np.stack([grey[0], 255 - grey[1]])[:, None])
    assert _run(capsys, ["convert", mixed, "--out", tmp_path / "mixed.npz"])[0] == 0


# An output inside a folder the run reads: refused before any work, the folder left as it was.
OUTPUT_INSIDE_INPUT = [
    ("boost", lambda w: ["boost", w / "png", "--model", JCD, "--out", w / "png" / "x.npz"], "png/x.npz"),
    ("convert", lambda w: ["convert", w / "png", "--out", w / "png" / "sub"], "png/sub"),
    ("train-features", lambda w: ["train-features", "--data", f"folder:{w / 'data'}", "--epochs", "1",
                                  "--out", w / "data" / "c0" / "f.safetensors"], "--data"),
    ("diagnose", lambda w: ["diagnose", "--model", JCD, "--samples", f"ct1={w / 'png'}", "--out", w / "png"],
     "--samples"),
    ("check-judges", lambda w: ["check-judges", "--samples", w / "png", "--judges", "fmnist-allconv",
                                "--out", w / "png" / "j.json"], "--samples"),
    ("tune", lambda w: ["tune", w / "png", "--model", JCD, "--ref", w / "ref.npz", "--out", w / "png" / "t.json"],
     "png/t.json"),
]


@pytest.mark.parametrize("row", OUTPUT_INSIDE_INPUT, ids=[r[0] for r in OUTPUT_INSIDE_INPUT])
def test_an_output_inside_a_folder_the_run_reads_is_refused(row, files, tmp_path, capsys):
    from PIL import Image

    _, argv, must_name = row
    images, labels = load_samples(files / "good.npz")
    save_samples(tmp_path / "png", images, labels)
    for c in ("c0", "c1"):
        (tmp_path / "data" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(images[i, 0]).save(tmp_path / "data" / c / f"{i}.png")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    code, err = _run(capsys, argv(tmp_path))
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "a folder this run reads" in err and must_name in err, err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def _check_judges_argv(samples, out, *extra):
    return ["check-judges", "--samples", samples, "--judges", "fmnist-allconv", "--reference-count", "4", "--num", "4",
            "--device", "cpu", "--out", out, *extra]


@pytest.mark.parametrize("make, extra, message", [
    (lambda d: save_samples(d / "labels-10.npz", np.zeros((4, 1, 32, 32), np.uint8), np.array([0, 3, 10, 11])), [],
     "labels-10.npz: labels run from 0 to 11, but the attacker fmnist-attacker knows 10 classes"),
    (lambda d: save_samples(d / "rgb.npz", np.zeros((4, 3, 32, 32), np.uint8), np.arange(4)), [],
     "--samples {d}/rgb.npz: images are 3x32x32 (CxHxW), but --data fmnist test images are 1x32x32"),
    (lambda d: save_samples(d / "ok.npz", np.zeros((4, 1, 32, 32), np.uint8), np.arange(4)),
     ["--reference-count", "100000"], "--reference-count 100000 and --num 4: need 100004 real images"),
    (lambda d: save_samples(d / "ok.npz", np.zeros((4, 1, 32, 32), np.uint8), np.arange(4)),
     ["--judges", "fmnist-allconv,nope-judge"], "--judges nope-judge: no such judge"),
], ids=["labels-beyond-the-attacker", "rgb-samples-grey-data", "reference-count-too-large", "unknown-judge"])
def test_check_judges_checks_its_inputs_before_any_work_naming_the_flag(make, extra, message, tmp_path, capsys):
    samples = make(tmp_path)
    out = tmp_path / "j.json"
    code, err = _run(capsys, _check_judges_argv(samples, out, *extra))
    _assert_clean_refusal(code, err, message.format(d=tmp_path), out)


def test_a_path_with_a_newline_is_escaped_so_the_error_stays_one_line(tmp_path, capsys):
    code, err = _run(capsys, ["boost", tmp_path / "no\nsuch.npz", "--model", JCD, "--out", tmp_path / "o.npz"])
    assert code == 2 and len(err.splitlines()) == 1 and "no\\nsuch.npz" in err, err


def test_tune_refuses_too_few_samples_to_choose_on_one_half_and_confirm_on_the_other(tuning, tmp_path, capsys):
    from cmboost.files.samples import load_samples

    images, labels = load_samples(tuning / "val.npz")
    save_samples(tmp_path / "few.npz", images[:10], labels[:10])
    argv = _tune_argv(tuning, tmp_path / "t.json")
    argv[1] = tmp_path / "few.npz"
    code, err = _run(capsys, argv)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert str(tmp_path / "few.npz") in err and "at least 16" in err and "confirm" in err
    assert not (tmp_path / "t.json").exists() and not (tmp_path / "t.json.job").exists()


# ----------------------------------------------------------------------------- a settings file of another network

TUNED = ASSETS / "tuned-ct1.json"  # tuned for jcd-robust-1.5-ect, not for JCD


def test_boost_refuses_a_settings_file_tuned_for_another_network_naming_both(files, tmp_path, capsys):
    out = tmp_path / "out.npz"
    code, err = _run(capsys, ["boost", files / "good.npz", "--model", JCD, "--settings", TUNED, "--out", out,
                              "--device", "cpu"])
    _assert_clean_refusal(code, err, f"--settings {TUNED}", out)
    assert f"--model {JCD}" in err and "--allow-other-network" in err, err


def test_diagnose_refuses_a_settings_file_tuned_for_another_network_naming_both(files, tmp_path, capsys):
    out = tmp_path / "diag"
    code, err = _run(capsys, ["diagnose", "--model", JCD, "--samples", f"x={files / 'good.npz'}", "--settings", TUNED,
                              "--device", "cpu", "--out", out])
    _assert_clean_refusal(code, err, f"--settings {TUNED}", out)
    assert f"--model {JCD}" in err and "--allow-other-network" in err, err


def test_boost_with_allow_other_network_says_so_in_one_line(files, tmp_path, capsys):
    out = tmp_path / "out.npz"
    argv = ["boost", files / "good.npz", "--model", JCD, "--settings", TUNED, "--allow-other-network", "--steps", "1",
            "--device", "cpu", "--no-grid", "--out", out]
    assert cli_main([str(a) for a in argv + ["--dry-run"]]) == 0
    tuned_for = json.loads(TUNED.read_text())["fingerprint"]["model"]
    assert tuned_for in json.loads(capsys.readouterr().out)["other_network"]
    code = cli_main([str(a) for a in argv])
    said = [line for line in capsys.readouterr().out.splitlines() if "tuned for the network" in line]
    assert code == 0 and out.is_file()
    assert len(said) == 1 and tuned_for in said[0] and str(JCD) in said[0] and "--allow-other-network" in said[0]


def test_a_settings_file_of_its_own_network_or_without_a_fingerprint_model_is_used(files, tmp_path, capsys):
    booster = ASSETS / "jcd-robust-1.5-ect.safetensors"  # the network the shipped file was tuned for
    argv = ["boost", files / "good.npz", "--out", tmp_path / "o.npz", "--dry-run", "--device", "cpu", "--settings"]
    assert cli_main([str(a) for a in argv + [TUNED, "--model", booster]]) == 0
    assert "other_network" not in json.loads(capsys.readouterr().out)
    older = json.loads(TUNED.read_text())
    del older["fingerprint"]["model"]  # files written before tune recorded the network
    (tmp_path / "older.json").write_text(json.dumps(older))
    assert cli_main([str(a) for a in argv + [tmp_path / "older.json", "--model", JCD]]) == 0
    assert "other_network" not in json.loads(capsys.readouterr().out)
    older["fingerprint"]["model"] = 7
    (tmp_path / "bad.json").write_text(json.dumps(older))
    code, err = _run(capsys, argv + [tmp_path / "bad.json", "--model", JCD])
    _assert_clean_refusal(code, err, f"--settings {tmp_path / 'bad.json'}: fingerprint.model 7", tmp_path / "o.npz")


def test_evaluate_refuses_reference_images_of_another_size_naming_both(files, tmp_path, capsys):
    """A reference that keeps its images (arr_0) shows what it measured: 30x30 crops against 32x32
    samples are other data, even where the stored features let the metrics be computed. 28x28
    Fashion-MNIST, as evaluate-ref --data fmnist stores it, is not: a domain net zero-pads it to 32x32
    as the samples were padded (test_too_few_images_for_the_feature_dimension_warn_in_one_line)."""
    from cmboost.metrics.reference import reference_stats, save_reference

    images, _ = load_samples(files / "good.npz")
    ref = reference_stats(images, "fmnist-allconv", source="crops")
    ref.images = np.ascontiguousarray(ref.images[:, :, 1:31, 1:31])
    save_reference(tmp_path / "crops.npz", ref)
    out = tmp_path / "m.json"
    code, err = _run(capsys, ["evaluate", files / "good.npz", "--ref", tmp_path / "crops.npz", "--features",
                              "fmnist-allconv", "--device", "cpu", "--json", out])
    _assert_clean_refusal(code, err, f"--ref {tmp_path / 'crops.npz'} images (arr_0) are 1x30x30", out)
    assert f"{files / 'good.npz'}: images are 1x32x32" in err, err
