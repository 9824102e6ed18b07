"""The shipped reporting judge fmnist-allconv and two of the shipped tuning candidates are what the recipe trained: architecture, seed, command, and the test accuracy they record (one file per pair of heavy checks, so that parallel workers share them)."""

import json

import pytest

from _shipped_nets import accuracy_and_near_ties, check_shipped_candidate, fmnist_test_split
from cmboost.metrics.domain_net import SHIPPED, load_domain_net
from cmboost.metrics.domain_training import TrainSettings, classify_accuracy
from cmboost.metrics.features import load_feature_extractor

VGG_IDENTITY = "domain-net-b92ac005830d632d"


@pytest.fixture(scope="module")
def fmnist_test():
    return fmnist_test_split()


def test_shipped_allconv_net_is_an_independent_documented_judge(fmnist_test):
    net, meta = load_domain_net("fmnist-allconv")
    assert net.config.arch == "allconv" and net.config.feature_dim == 256 and net.config.image_size == 32
    assert "train-features --data fmnist" in meta["command"] and "--arch allconv" in meta["command"]
    assert json.loads(meta["settings"])["seed"] == 4242 != TrainSettings().seed
    assert SHIPPED["fmnist-allconv"].stat().st_size < 1.5e6
    extractor = load_feature_extractor("fmnist-allconv", device="cpu")
    assert extractor.identity.startswith("domain-net-") and extractor.identity != VGG_IDENTITY
    images, labels = fmnist_test
    assert len(images) == 10000
    assert accuracy_and_near_ties(net, images[:8], labels[:8])[0] == classify_accuracy(net, images[:8], labels[:8])
    accuracy, near_ties = accuracy_and_near_ties(net, images, labels)
    # The accuracy recorded when the file was trained (on another CPU) is ours up to the images that
    # rounding could reclassify; the README states the same figure.
    assert abs(accuracy - float(meta["test_accuracy"])) <= near_ties / len(images) + 1e-12
    assert f"**Test accuracy: {float(meta['test_accuracy']):.4f}**" in (SHIPPED["fmnist-allconv"].parent / "README.md").read_text()


@pytest.mark.parametrize("name, arch, seed", [("fmnist-shallow", "shallow", 3131), ("fmnist-mixer", "mixer", 5353)])
def test_shipped_tuning_candidates_are_what_the_recipe_trained(name, arch, seed, fmnist_test):
    check_shipped_candidate(name, arch, seed, *fmnist_test)
