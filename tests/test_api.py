"""The Python API (cmboost/api.py): docs/api.md's examples run as written, records or keywords but
never both, unknown keywords refused, and arrays give the images the file path gives."""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cmboost
from cmboost.boosting.boost import BoostRun
from cmboost.cm.train_config import mode_settings
from cmboost.errors import UserInputError

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def _examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_documented_examples_run(tmp_path):
    examples = _examples()
    assert len(examples) >= 2
    script = tmp_path / "examples.py"
    script.write_text("\n\n".join(examples))
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '"judge": "fmnist-allconv"' in done.stdout and "trained my-judge.safetensors" in done.stdout, done.stdout
    assert (tmp_path / "ct1-boosted.npz").is_file() and (tmp_path / "my-judge.safetensors").is_file()
    assert not list(tmp_path.glob("*.job"))  # finished jobs leave no folder


def test_every_verb_function_is_exported():
    for name in ("sample", "boost", "tune", "evaluate", "evaluate_ref", "check_judges", "diagnose", "train_jcd",
                 "train_cm", "train_features"):
        assert callable(getattr(cmboost, name)), name
    import importlib
    import pkgutil

    for module in pkgutil.walk_packages(cmboost.__path__, "cmboost."):
        if module.name != "cmboost.__main__":  # runs the command line
            importlib.import_module(module.name)  # importing a module sets an attribute of its package
    assert callable(cmboost.boost) and callable(cmboost.tune) and callable(cmboost.train_jcd)  # not shadowed


def test_a_record_and_keywords_together_or_an_unknown_keyword_are_refused(tmp_path):
    from cmboost.jcd.config import TrainConfig

    config = TrainConfig(data="fmnist", run_dir=str(tmp_path / "run"), iters=1, arch="resnet_small", objective="ce")
    with pytest.raises(TypeError, match="not both"):
        cmboost.train_jcd(config, iters=2)
    with pytest.raises(TypeError, match="no_such_field"):
        cmboost.train_jcd(data="fmnist", run_dir=str(tmp_path / "run"), iters=1, no_such_field=3)
    with pytest.raises(TypeError, match="not both"):
        cmboost.boost("x.npz", run=BoostRun(samples="x.npz", model="m", out="o.npz"))
    with pytest.raises(UserInputError, match="--batch-size 0"):
        cmboost.boost("x.npz", "m.safetensors", batch_size=0)
    assert not (tmp_path / "run").exists()


def test_boosting_arrays_gives_the_images_of_the_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 1, 32, 32), dtype=np.uint8)
    labels = np.arange(6) % 10
    booster = cmboost.asset("jcd-joint-w24.safetensors")
    hyper = {"eps": 0.5, "steps": 2}
    boosted, kept = cmboost.boost((images, labels), booster, hyper=hyper, device="cpu", progress=False)
    from cmboost.files.samples import load_samples, save_samples

    save_samples(tmp_path / "in.npz", images, labels)
    path = cmboost.boost(tmp_path / "in.npz", booster, tmp_path / "out.npz", hyper=hyper, device="cpu",
                         progress=False, grid=False)
    assert np.array_equal(load_samples(path)[0], boosted) and np.array_equal(kept, labels)
    assert not np.array_equal(boosted, images)
    metrics = cmboost.evaluate(boosted, cmboost.asset("ref-test-fmnist-allconv.npz"), features="fmnist-allconv",
                               device="cpu")
    assert np.isfinite(metrics["fid"])


# A wrong type is refused at the top of the function, naming the argument (never iterated letter by
# letter, never an AttributeError deep inside).
WRONG_TYPES = [
    ("tune-refs-a-string", lambda: cmboost.tune(samples="v.npz", model="m", refs="ref.npz", out="t.json"),
     "refs: expected a list or tuple, got the string 'ref.npz'"),
    ("tune-refs-none", lambda: cmboost.tune(samples="v.npz", model="m", refs=None, out="t.json"), "refs: expected"),
    ("tune-judges-a-string", lambda: cmboost.tune(judges="fmnist"), "judges: expected a list or tuple"),
    ("tune-choice-a-dict", lambda: cmboost.tune(samples="v.npz", model="m", refs=["r.npz"], out="t.json",
                                                choice={"criterion": "fid"}), "choice: expected a TuneSettings"),
    ("check-judges-judges-a-string", lambda: cmboost.check_judges(samples="s.npz", out="j.json",
                                                                  judges="fmnist-allconv"), "judges: expected a list"),
    ("check-judges-settings-a-dict", lambda: cmboost.check_judges(samples="s.npz", out="j.json",
                                                                  settings={"seed": 1}), "settings: expected a "
                                                                                         "CheckSettings"),
    ("diagnose-hyper-a-string", lambda: cmboost.diagnose(model="m", out="d", hyper="eps=1"), "hyper: expected a dict"),
    ("diagnose-numbers-a-dict", lambda: cmboost.diagnose(model="m", out="d", numbers={"seed": 1}),
     "numbers: expected a DiagnoseSettings"),
    ("diagnose-samples-a-string", lambda: cmboost.diagnose(model="m", out="d", samples="ct1=x.npz"), "samples: expected"),
    ("train-features-settings-a-dict", lambda: cmboost.train_features(data="fmnist", out="f.safetensors",
                                                                      settings={"epochs": 1}), "settings: expected"),
    ("sample-float-count", lambda: cmboost.sample(cmboost.asset("ct.safetensors"), 2.5), "num: expected a whole number"),
    ("sample-string-count", lambda: cmboost.sample(cmboost.asset("ct.safetensors"), "4"), "num: expected a whole number"),
    ("sample-model-none", lambda: cmboost.sample(None, 4), "model: expected a path"),
    ("boost-samples-none", lambda: cmboost.boost(None, cmboost.asset("jcd-joint-w24.safetensors")), "samples: expected"),
    ("boost-model-none", lambda: cmboost.boost("x.npz", None), "model: expected a path"),
    ("boost-seed-a-float", lambda: cmboost.boost("x.npz", "m", seed=1.5), "seed: expected a whole number"),
    ("train-jcd-generated-arrays", lambda: cmboost.train_jcd(data="fmnist", run_dir="r", iters=1,
                                                             generated=(np.zeros((2, 1, 32, 32), np.uint8),
                                                                        np.zeros(2, np.int64))),
     r"generated\[0\]: expected a string"),
    ("train-cm-shape-a-dict", lambda: cmboost.train_cm(run_dir="r", settings=mode_settings("edm", iters=1),
                                                       shape={"model_channels": 8}), "shape: expected a UNetShape"),
    ("evaluate-batch-size-a-float", lambda: cmboost.evaluate("x.npz", "r.npz", batch_size=2.5), "batch_size: expected"),
]


@pytest.mark.parametrize("call, message", [r[1:] for r in WRONG_TYPES], ids=[r[0] for r in WRONG_TYPES])
def test_a_wrong_argument_type_is_a_type_error_naming_the_argument(call, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TypeError, match=message):
        call()
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize("name", ["/etc/hostname", "../../../../etc/hostname", "../fmnist/ct.safetensors",
                                  "README.md/..", ""])
def test_asset_accepts_only_names_of_shipped_files(name):
    with pytest.raises(UserInputError, match="not the name of a file shipped with cmboost"):
        cmboost.asset(name)
    assert cmboost.asset("ct.safetensors").is_file() and cmboost.asset(Path("ct.safetensors")).is_file()


def test_paths_may_be_given_as_path_objects_where_a_record_takes_strings(tmp_path):
    from cmboost.api import _checked_arguments
    from cmboost.tuning.tune import TuneRun

    checked = _checked_arguments(TuneRun, {"refs": [tmp_path / "a.npz", "b.npz"], "samples": tmp_path / "v.npz"})
    assert checked == {"refs": (str(tmp_path / "a.npz"), "b.npz"), "samples": str(tmp_path / "v.npz")}
