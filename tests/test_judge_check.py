"""The judge check: a judge that ignores content fails the ladder, a judge that reads the attacker's
class evidence fails the transfer test, a real domain net ranks the ladder, and the CLI refuses bad input."""

import json

import numpy as np
import pytest
import torch

from cmboost.cli import main
from cmboost.cm.sample import SampleRun, sample
from cmboost.files.datasets import load_dataset
from cmboost.errors import UserInputError
from cmboost.metrics.domain_net import load_domain_net
from cmboost.metrics.features import DomainFeatures, load_feature_extractor
from cmboost.metrics.judge_check import (CheckSettings, attacker_edit, check_judge, jpeg, ladders,
                                         make_transfer_edits, mix)
from cmboost.files.samples import load_samples
from pathlib import Path

import cmboost

ASSETS = Path(cmboost.__file__).parent / "assets" / "fmnist"
SETTINGS = CheckSettings(bootstrap=5, transfer_eps=(1.0,))
N, REF = 120, 300


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("judges") / "cd1.npz"
    sample(SampleRun(model=str(ASSETS / "cd.safetensors"), out=str(out), num=N, steps=1, seed=5, device="cpu", progress=False))
    generated, labels = load_samples(out)
    real, _, _ = load_dataset("fmnist", "test", image_size=32)
    attacker, _ = load_domain_net("fmnist")
    edits = make_transfer_edits(attacker, generated, labels, SETTINGS)
    families = ladders(real[REF:REF + N], generated, SETTINGS)
    return {"path": out, "generated": generated, "labels": labels, "real": real, "edits": edits,
            "families": families}


class Blind:
    """A judge that ignores image content: its features are noise from its own stream."""
    name, identity, pool_dim = "blind", "blind", 8

    def __init__(self):
        self.gen = torch.Generator().manual_seed(0)

    def __call__(self, images_u8):
        return {"pool": torch.randn(len(images_u8), 8, generator=self.gen), "logits": None, "spatial": None}


class Confidence(DomainFeatures):
    """A judge built to be fooled: its features are the attacker's own confidence (max p and negative
    entropy of p(y|x)), which the attacker's edits raise towards that of real images."""

    def __call__(self, images_u8):
        p = torch.softmax(super().__call__(images_u8)["logits"].double(), 1)
        pool = torch.stack([p.max(1).values, (p * p.clamp_min(1e-30).log()).sum(1)], 1).float()
        return {"pool": pool, "logits": None, "spatial": None}


def _check(judge, data):
    return check_judge(judge, data["real"][:REF], data["real"][REF:REF + N], data["generated"], data["families"],
                       data["edits"], SETTINGS)


def test_a_judge_that_ignores_content_fails_the_ladder(data):
    result = _check(Blind(), data)
    assert not result["passed"] and not result["ladder_monotonic"]
    assert any("ladder not monotonic" in r for r in result["reasons"])


def test_a_judge_built_to_be_fooled_fails_the_transfer_test(data):
    twin, _ = load_domain_net("fmnist")
    result = _check(Confidence(twin, "confidence"), data)
    edit = result["transfer"]["edits"][0]
    assert edit["rewarded"] and result["transfer"]["rewards_adversarial_edits"] and not result["passed"]
    assert edit["fid_change"] < -SETTINGS.error_bars * edit["bootstrap_std"]
    assert edit["random"]["fid"] > result["transfer"]["none"]["fid"]  # the same norm at random is no gain
    assert any("rewards the attacker" in r for r in result["reasons"])


def test_a_domain_net_of_another_family_ranks_every_ladder(data):
    result = _check(load_feature_extractor("fmnist-allconv", "cpu"), data)
    assert result["ladder_monotonic"], {k: [s["fid"] for s in v["steps"]] for k, v in result["ladder"].items()}
    assert not result["transfer"]["rewards_adversarial_edits"]


def test_attacker_edit_keeps_each_radius_and_raises_the_class_evidence(data):
    net, _ = load_domain_net("fmnist")
    x = torch.from_numpy(data["generated"][:16]).float() / 255
    y = torch.from_numpy(data["labels"][:16].astype(np.int64))
    radius = torch.linspace(0.5, 2.0, 16)
    moved = attacker_edit(net, x, y, radius, steps=5)
    assert ((moved - x).flatten(1).norm(dim=1) <= radius + 1e-4).all() and moved.min() >= 0 and moved.max() <= 1
    with torch.no_grad():
        before = torch.log_softmax(net(x)[1], 1).gather(1, y[:, None])
        after = torch.log_softmax(net(moved)[1], 1).gather(1, y[:, None])
    assert (after > before).all()
    exact = attacker_edit(net, x, y, radius, steps=5, exact_norm=True)  # the demo's control: the full norm
    assert torch.allclose((exact - x).flatten(1).norm(dim=1), radius, rtol=1e-3)


def test_damage_steps():
    images = (np.random.default_rng(0).random((6, 1, 32, 32)) * 255).astype(np.uint8)
    other = np.zeros_like(images)
    mixed = mix(images, other, 0.5, seed=1)
    assert (mixed.reshape(6, -1).max(1) == 0).sum() == 3
    assert jpeg(images, 10).shape == images.shape and not np.array_equal(jpeg(images, 10), images)
    assert np.abs(jpeg(images, 95).astype(int) - images).mean() < np.abs(jpeg(images, 10).astype(int) - images).mean()


def test_cli_writes_the_report_and_refuses_bad_input(data, tmp_path, capsys):
    out = tmp_path / "judges.json"
    args = ["check-judges", "--samples", str(data["path"]), "--judges", "fmnist-allconv",
            "--reference-count", "200", "--num", "60", "--bootstrap", "3", "--device", "cpu", "--out", str(out)]
    assert main(args) == 0
    report = json.loads(out.read_text())
    assert set(report["judges"]) == {"fmnist-allconv"}
    assert report["attacker"]["name"] == "fmnist-attacker" or report["attacker"]["name"]
    assert main(args) == 2 and "already exists" in capsys.readouterr().err  # never over an existing report
    bad = tmp_path / "bad.json"
    for extra, problem in ((["--judges", "fmnist-allconv", "--attacker", "fmnist-allconv"], "attacker"),
                           (["--num", "1"], "--num"), (["--bootstrap", "1"], "bootstrap"),
                           (["--reference-count", "9000", "--num", "2000"], "--reference-count 9000 and --num 2000: need"),
                           (["--judges", "fmnist-allconv,no-such-judge"], "--judges no-such-judge: no such judge"),
                           (["--attacker", "nope"], "--attacker nope: no such judge")):
        argv = args[:-2] + ["--out", str(bad)] + extra
        assert main(argv) == 2, extra
        err = capsys.readouterr().err
        assert problem in err and err.count("\n") == 1, err
        assert not bad.exists()


def test_effnet_resolution_is_part_of_the_judge_name():
    from cmboost.errors import UserInputError
    from cmboost.metrics.features import effnet_resolution

    assert effnet_resolution("effnet-lite0") is None and effnet_resolution("effnet-lite0@224") == 224
    for bad in ("effnet-lite0@", "effnet-lite0@16", "effnet-lite0@x", "effnet-lite0-224"):
        with pytest.raises(UserInputError, match="effnet-lite0@R"):
            effnet_resolution(bad)


def test_a_stopped_check_resumes_from_its_finished_judges(data, tmp_path):
    from cmboost.metrics.judge_check import run_judge_check

    partial = tmp_path / "j.json.job"
    args = (data["real"][:REF + N], data["generated"], data["labels"])
    kwargs = dict(attacker="fmnist", reference_count=REF, probe_count=N, settings=SETTINGS, log=lambda *_: None,
                  job_folder=partial)
    first = run_judge_check(["fmnist-allconv"], *args, **kwargs)
    assert json.loads((partial / "rows.json").read_text())["fmnist-allconv"] == json.loads(json.dumps(first["judges"]["fmnist-allconv"]))
    said = []
    again = run_judge_check(["fmnist-allconv"], *args, **dict(kwargs, log=said.append))
    assert any("taken from" in line for line in said) and again["judges"] == json.loads(json.dumps(first["judges"]))
    with pytest.raises(UserInputError, match=r"another configuration \(settings\.bootstrap"):  # other settings
        run_judge_check(["fmnist-allconv"], *args, **dict(kwargs, settings=CheckSettings(bootstrap=6, transfer_eps=(1.0,))))
