"""Each verb's flags take their defaults from its record and show them in --help, and bad numbers
stop the command with exit 2 and one line naming the flag, before anything is written.

The default checks compare every flag's default with the record field it feeds: a default written a
second time in the command line would drift from the record, and fail here.
"""

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cmboost
from cmboost.cli import build_parser
from cmboost.cli import main as cli_main
from cmboost.cli.train_cm import UNFLAGGED as CM_UNFLAGGED
from cmboost.cli.train_features import UNFLAGGED as FEATURES_UNFLAGGED
from cmboost.cli.train_jcd import CHANNELS_LAST
from cmboost.cm.sample import SampleSettings
from cmboost.cm.train_config import MODES, LoopSettings, TrainSettings as CMSettings, UNetShape, mode_default
from cmboost.diagnostic.measures import DiagnoseSettings
from cmboost.metrics.domain_net import DomainNetConfig
from cmboost.metrics.domain_training import TrainSettings as FeatureSettings
from cmboost.metrics.reference import reference_stats
from cmboost.files.samples import save_samples
from cmboost.records import field_default, param_default, shown
from cmboost.jcd.config import TrainConfig
from cmboost.tuning.candidates import TuneSettings
from cmboost.cm.sample import SampleRun
from cmboost.cm.train_config import TrainCMRun, mode_settings
from cmboost.metrics.evaluate import EvaluateRun
from cmboost.metrics.evaluate_ref import ReferenceRun

ASSETS = Path(cmboost.__file__).parent / "assets" / "fmnist"
VERBS = ("boost", "sample", "tune", "evaluate", "evaluate-ref", "train-cm", "train-jcd", "train-features", "diagnose")


def verb_parser(verb: str) -> argparse.ArgumentParser:
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[verb]


def actions(verb: str) -> dict[str, argparse.Action]:
    return {a.dest: a for a in verb_parser(verb)._actions}


def help_text(action: argparse.Action) -> str:
    """The action's help as --help prints it (argparse fills %(default)s and the like)."""
    return " ".join((action.help % dict(vars(action), prog="cmboost")).split())


def assert_shows_default(action: argparse.Action, default) -> None:
    assert f"(default: {shown(default)})" in help_text(action), (action.option_strings, help_text(action))


def field_defaults(record_type, skip=()) -> dict:
    return {f.name: field_default(record_type, f.name) for f in dataclasses.fields(record_type)
            if (f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING)
            and f.name not in skip}


def test_train_jcd_flags_read_train_config():
    flags = actions("train-jcd")
    for name, default in field_defaults(TrainConfig).items():
        action = flags[name]
        if name == "channels_last":
            assert CHANNELS_LAST[action.default] is default
            continue
        assert action.default == default, name
        if default is not None and not isinstance(default, bool):
            assert_shows_default(action, default)


def test_train_cm_flags_read_train_settings_and_unet_shape():
    flags = actions("train-cm")
    for name, default in field_defaults(CMSettings, skip=CM_UNFLAGGED).items():
        if name in ("lr", "distance"):  # per mode: the flag stays unset and the help lists each mode's
            assert flags[name].default is None
            modes = MODES if name == "lr" else ("cd", "ct")
            assert all(f"{mode} {mode_default(mode, name)}" in help_text(flags[name]) for mode in modes)
            continue
        assert flags[name].default == default, name
        if default is not None:
            assert_shows_default(flags[name], default)
    for name, default in field_defaults(UNetShape).items():
        given = flags[name].default
        if isinstance(default, tuple):  # typed as a comma-separated list
            given = tuple(int(v) for v in given.split(","))
        assert given == default, name
        assert f"(default: {flags[name].default})" in help_text(flags[name])
    assert mode_default("cd", "lr") != mode_default("edm", "lr") == field_default(CMSettings, "lr")
    for name, default in field_defaults(LoopSettings).items():  # how one invocation runs: not in the run's record
        assert flags[name].default == default, name
        if default is not None:
            assert_shows_default(flags[name], default)


def test_train_features_flags_read_its_settings():
    flags = actions("train-features")
    for name, default in field_defaults(FeatureSettings, skip=FEATURES_UNFLAGGED).items():
        assert flags[name].default == default, name
        if not isinstance(default, bool):
            assert_shows_default(flags[name], default)
    assert flags["arch"].default == field_default(DomainNetConfig, "arch")
    assert_shows_default(flags["arch"], flags["arch"].default)


@pytest.mark.parametrize("verb, record_type", [("sample", SampleSettings), ("tune", TuneSettings),
                                               ("diagnose", DiagnoseSettings)])
def test_sample_and_tune_flags_read_their_records(verb, record_type):
    flags = actions(verb)
    for name, default in field_defaults(record_type).items():
        assert flags[name].default == default, name
        if isinstance(default, bool):  # a switch: on when given, its default said in words
            assert isinstance(flags[name], argparse._StoreTrueAction) and default is False, name
        elif default is not None:
            assert_shows_default(flags[name], default)


def test_compute_block_defaults_are_the_runtimes():
    """One compute block by default: tune's and sample's come from runtime.BLOCK_SIZE; boost's flag
    stays unset, so that --settings can use the block tune scored with, and says both in --help."""
    from cmboost.runtime import BLOCK_SIZE

    assert field_default(TuneSettings, "batch_size") == field_default(SampleSettings, "block_size") == BLOCK_SIZE
    block = actions("boost")["block_size"]
    assert block.default is None
    assert "--settings" in help_text(block) and f"else {BLOCK_SIZE})" in help_text(block)


def test_evaluate_verbs_share_the_reference_defaults():
    for verb in ("evaluate", "evaluate-ref"):
        flags = actions(verb)
        assert flags["num_features"].default == param_default(reference_stats, "num_features")
        assert flags["split"].default == actions("evaluate-ref")["split"].default
    assert_shows_default(actions("evaluate-ref")["num_features"], param_default(reference_stats, "num_features"))


def _verb_records():
    """(verb, record type, fields the verb's flags set under the field's own name, field -> dest)."""
    from cmboost.boosting.boost import BoostRun
    from cmboost.demo.plan import DemoOptions
    from cmboost.diagnostic.diagnose import DiagnoseRun
    from cmboost.metrics.train_features import FeatureTraining
    from cmboost.tuning.tune import TuneRun

    return [("boost", BoostRun, ("labels", "seed", "batch_size", "device", "precision", "method", "settings",
                                 "threshold_from", "arch", "block_size", "allow_other_network"), {}),
            ("diagnose", DiagnoseRun, ("method", "realness", "teacher", "real", "device", "precision",
                                       "allow_other_network"), {}),
            ("tune", TuneRun, ("classifier", "threshold_from", "grid", "device", "precision"), {"judges": "judge"}),
            ("train-features", FeatureTraining, ("arch", "data_dir", "limit", "threads", "device", "precision"), {}),
            ("demo", DemoOptions, ("out_dir", "device", "threads"), {}),
            ("evaluate", EvaluateRun, ("features", "batch_size", "device", "precision", "inception_weights",
                                       "dinov2_weights", "threads", "json"), {}),
            ("evaluate-ref", ReferenceRun, ("features", "batch_size", "device", "precision", "threads", "split",
                                            "data_dir", "num_features", "seed"), {}),
            ("sample", SampleRun, ("steps", "seed", "batch_size", "block_size", "kind", "device", "precision"),
             {"num_levels": "N"}),
            ("train-cm", TrainCMRun, ("data_dir", "device", "precision"), {})]


# Each verb: the CLI's argv and the API call that name the same required inputs, and the runner in
# cmboost.api that receives the record. Everything else is left to the defaults.
def _same_inputs(assets: Path, tmp: Path) -> list:
    model = str(assets / "jcd-joint.safetensors")
    samples = str(save_samples(tmp / "val.npz", np.zeros((4, 1, 28, 28), np.uint8)))
    generator, ref = str(assets / "ct.safetensors"), str(assets / "ref-test-fmnist-allconv.npz")
    settings = mode_settings("ect", iters=5, teacher=generator)
    return [
        ("boost", ["boost", samples, "--model", model, "--out", str(tmp / "b.npz")], "boost_run",
         lambda: cmboost.boost(samples, model, str(tmp / "b.npz"))),
        ("sample", ["sample", "--model", generator, "--num", "8", "--out", str(tmp / "s.npz")], "sample_run",
         lambda: cmboost.sample(generator, 8, str(tmp / "s.npz"))),
        ("evaluate", ["evaluate", samples, "--ref", ref], "evaluate_run", lambda: cmboost.evaluate(samples, ref)),
        ("evaluate-ref", ["evaluate-ref", "--data", "fmnist", "--out", str(tmp / "r.npz")], "make_reference",
         lambda: cmboost.evaluate_ref(data="fmnist", out=str(tmp / "r.npz"))),
        ("train-cm", ["train-cm", "--mode", "ect", "--iters", "5", "--teacher", generator, "--run-dir", str(tmp / "cm")],
         "train_cm_run", lambda: cmboost.train_cm(run_dir=str(tmp / "cm"), settings=settings)),
        ("tune", ["tune", samples, "--model", model, "--ref", ref, "--out", str(tmp / "t.json")], "tune_run",
         lambda: cmboost.tune(samples=samples, model=model, refs=(ref,), out=str(tmp / "t.json"))),
        ("check-judges", ["check-judges", "--samples", samples, "--out", str(tmp / "j.json")], "check_judges_run",
         lambda: cmboost.check_judges(samples=samples, out=str(tmp / "j.json"))),
        ("diagnose", ["diagnose", "--model", model, "--out", str(tmp / "d")], "diagnose_run",
         lambda: cmboost.diagnose(model=model, out=str(tmp / "d"))),
        ("train-features", ["train-features", "--data", "fmnist", "--out", str(tmp / "f.safetensors")],
         "train_features_run", lambda: cmboost.train_features(data="fmnist", out=str(tmp / "f.safetensors"))),
        ("train-jcd", ["train-jcd", "--data", "fmnist", "--run-dir", str(tmp / "jcd"), "--iters", "3", "--arch",
                       "resnet_small", "--objective", "ce"],
         "train_jcd_run", lambda: cmboost.train_jcd(data="fmnist", run_dir=str(tmp / "jcd"), iters=3, arch="resnet_small",
                                                    objective="ce")),
    ]


@pytest.mark.parametrize("verb", ["boost", "sample", "tune", "evaluate", "evaluate-ref", "check-judges", "diagnose",
                                  "train-cm", "train-jcd", "train-features"])
def test_the_api_builds_the_record_the_cli_builds(verb, tmp_path, monkeypatch):
    """The API's defaults are the command line's: the same required inputs give the same record,
    field by field (both come from the record; a default written again in either would differ here)."""
    from cmboost import api
    from cmboost.cli import _app

    argv, runner, call = next((a, r, c) for v, a, r, c in _same_inputs(ASSETS, tmp_path) if v == verb)
    cli_record = _app.VERB_MODULES_BY_NAME[verb].record_from(build_parser().parse_args(argv))
    seen = []
    monkeypatch.setattr(api, runner, lambda record: seen.append(record) or tmp_path / "x.npz")
    monkeypatch.setattr(api, "load_samples", lambda path: None)
    call()
    assert len(seen) == 1
    api_record = seen[0]
    if verb == "boost":  # the API boosts without a before/after grid only when it returns arrays
        api_record = dataclasses.replace(api_record, grid=cli_record.grid)
    assert api_record == cli_record


@pytest.mark.parametrize("verb, record_type, names, dests", _verb_records(), ids=lambda v: getattr(v, "__name__", v)
                         if not isinstance(v, (tuple, dict)) else "")
def test_every_verb_record_default_is_the_flag_default_and_shows_in_help(verb, record_type, names, dests):
    """A verb's flags take their defaults from its record, the one place each is stated: the parsed
    default equals the field's, and --help shows it."""
    flags = actions(verb)
    for name in names + tuple(dests):
        default = field_default(record_type, name)
        action = flags[dests.get(name, name)]
        parsed = action.default
        if name == "judges":
            parsed = tuple(parsed.split(","))
        assert parsed == default, (verb, name, parsed, default)
        if default is not None and not isinstance(default, bool):
            shown_default = ",".join(default) if name == "judges" else default
            assert f"(default: {shown(shown_default)})" in help_text(action), (verb, name, help_text(action))


def test_no_cli_module_states_a_default_of_its_own():
    """The defaults that drifted apart once (the realness reading, the step rule, the recall slack,
    the held-out split, the k-NN minimum) are written in one module each."""
    import re

    root = Path(cmboost.__file__).parent
    sources = {p: p.read_text() for p in root.rglob("*.py")}
    patterns = {r"\b2\.5 \* ": "boosting/config.py", r"\b55000\b": "files/datasets.py", r"= 0\.03\b": "tuning/candidates.py",
                r"realness_kind: str = \"": None, r"num_features < 4": None}
    for pattern, home in patterns.items():
        found = sorted(str(p.relative_to(root)) for p, text in sources.items() if re.search(pattern, text))
        assert found == ([home] if home else []), (pattern, found)


@pytest.mark.parametrize("verb", VERBS + ("demo", "check-judges"))
def test_help_shows_every_default(verb):
    """Every documented option with a value by default says which in --help (flags that switch
    something on or off, and unset ones, describe their default in words)."""
    for action in verb_parser(verb)._actions:
        if (not action.option_strings or action.help == argparse.SUPPRESS or action.default in (None, [])
                or isinstance(action.default, bool) or isinstance(action, argparse._HelpAction)):
            continue
        assert_shows_default(action, action.default)


# ----------------------------------------------------------------------------- bad numbers

@pytest.fixture(scope="module")
def folder_data(tmp_path_factory):
    """Four 16x16 images in two class folders: train-cm reads them before its loop flags are used."""
    root = tmp_path_factory.mktemp("data")
    for i in range(4):
        (root / f"c{i % 2}").mkdir(exist_ok=True)
        Image.fromarray(np.full((16, 16), 60 * i, np.uint8)).save(root / f"c{i % 2}" / f"{i}.png")
    return root


JCD = ["train-jcd", "--data", "fmnist", "--arch", "resnet_small", "--iters", "1", "--objective", "ce",
       "--device", "cpu", "--run-dir", "{out}"]
CM = ["train-cm", "--mode", "edm", "--iters", "2", "--data", "folder:{data}", "--no-progress", "--device", "cpu",
      "--run-dir", "{out}"]
FEATURES = ["train-features", "--data", "folder:{data}", "--device", "cpu", "--out", "{out}"]
SAMPLE = ["sample", "--model", str(ASSETS / "cd.safetensors"), "--num", "4", "--device", "cpu", "--out", "{out}"]
TUNE = ["tune", "{data}/val.npz", "--model", str(ASSETS / "jcd-joint.safetensors"), "--ref", "{data}/ref.npz",
        "--device", "cpu", "--out", "{out}"]
EVALUATE = ["evaluate", "{data}/samples.npz", "--ref", "{data}/ref.npz", "--device", "cpu", "--json", "{out}"]
EVALUATE_REF = ["evaluate-ref", "--data", "folder:{data}", "--device", "cpu", "--out", "{out}.npz"]
DIAGNOSE = ["diagnose", "--model", str(ASSETS / "jcd-joint.safetensors"), "--device", "cpu", "--out", "{out}"]
BOOST = ["boost", "{data}/samples.npz", "--model", str(ASSETS / "jcd-joint.safetensors"), "--device", "cpu",
         "--out", "{out}"]

# (base command, extra flags, the flag the one line must name)
BAD = [
    *[(JCD, [flag, *values], flag) for flag, *values in (
        ("--lr", "nan"), ("--lr", "inf"), ("--lr", "0"), ("--lr", "-0.00001"), ("--betas", "0.9", "nan"),
        ("--betas", "1", "0.999"), ("--gamma", "nan"), ("--gamma", "0"), ("--weight-decay", "-0.1"),
        ("--grad-clip", "nan"), ("--real-eps", "-1"), ("--real-eps", "inf"), ("--real-step-size", "nan"),
        ("--gen-eps", "-1"), ("--gen-step-size", "-0.1"), ("--iters", "-1"), ("--milestones", "10", "-5"),
        ("--real-steps", "-1"), ("--gen-steps", "-2"), ("--gen-steps-every", "-1"), ("--gen-max-steps", "-1"),
        ("--batch-size", "0"), ("--gen-batch-size", "0"), ("--image-size", "0"), ("--real-limit", "0"),
        ("--log-every", "0"), ("--ckpt-every", "0"), ("--seed", "-1"))],
    *[(CM, [flag, *values], flag) for flag, *values in (
        ("--lr", "nan"), ("--lr", "0"), ("--ema-rate", "1"), ("--ema-rate", "nan"), ("--target-ema", "-0.1"),
        ("--grad-clip", "inf"), ("--warmup", "-1"), ("--iters", "0"), ("--batch-size", "0"), ("--seed", "-1"),
        ("--model-channels", "0"), ("--channel-mult", "1,0"), ("--attention-resolutions", "0"),
        ("--num-res-blocks", "0"), ("--num-head-channels", "0"), ("--dropout", "nan"), ("--dropout", "1"),
        ("--save-every", "0"), ("--log-every", "0"), ("--max-minutes", "0"), ("--max-minutes", "nan"))],
    (CM[:2] + ["ct"] + CM[3:], ["--start-scales", "1"], "--start-scales"),
    (CM[:2] + ["cd", "--teacher", "t.safetensors"] + CM[3:], ["--num-scales", "1"], "--num-scales"),
    *[(FEATURES, [flag, value], flag) for flag, value in (
        ("--epochs", "0"), ("--batch-size", "0"), ("--lr", "nan"), ("--lr", "0"), ("--seed", "-1"),
        ("--limit", "-1"), ("--threads", "-1"))],
    *[(SAMPLE, [flag, value], flag) for flag, value in (("--num", "0"), ("--batch-size", "0"), ("--steps", "0"))],
    *[(TUNE, [flag, value], flag) for flag, value in (
        ("--max-recall-drop", "nan"), ("--max-recall-drop", "1.5"), ("--batch-size", "0"))],
    *[(EVALUATE, [flag, value], flag) for flag, value in (("--batch-size", "0"), ("--threads", "-1"))],
    *[(EVALUATE_REF, [flag, value], flag) for flag, value in (
        ("--batch-size", "0"), ("--threads", "-2"), ("--num-features", "3"))],
    *[(DIAGNOSE, [flag, *values], flag) for flag, *values in (
        ("--num-real", "0"), ("--num-samples", "0"), ("--attack-eps", "0.5", "-1"), ("--attack-steps", "0"),
        ("--sigmas", "inf"), ("--pag-eps", "0"), ("--pag-steps", "0"), ("--pag-rows", "-1"), ("--seed", "-1"),
        ("--batch-size", "0"), ("--threads", "-1"), ("--eps", "nan"))],
    (BOOST, ["--steps", "-1"], "--steps"),
    (BOOST, ["--eps", "nan"], "--eps"),
    (BOOST, ["--block-size", "0"], "--block-size"),
    (BOOST, ["--method", "sgld", "--sgld-noise", "inf"], "--sgld-noise"),
]


@pytest.mark.parametrize("base, extra, flag", BAD, ids=[f"{b[0]} {' '.join(e)}" for b, e, _ in BAD])
def test_a_bad_number_is_one_line_naming_the_flag_and_writes_nothing(base, extra, flag, folder_data, tmp_path,
                                                                      capsys):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = [a.format(out=out_dir / "result", data=folder_data) for a in base] + extra
    code = cli_main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert f"error: {flag} " in err or f"error: {flag}:" in err, err
    assert not any(out_dir.iterdir())
