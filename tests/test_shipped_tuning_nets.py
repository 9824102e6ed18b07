"""The shipped tuning committee's nets are what the recipe trained: architecture, seed, command, and the test accuracy they record."""

import json

import pytest

from _shipped_nets import accuracy_and_near_ties, fmnist_test_split
from cmboost.metrics.domain_net import SHIPPED, load_domain_net


@pytest.fixture(scope="module")
def fmnist_test():
    return fmnist_test_split()


@pytest.mark.parametrize("name, arch, seed", [("fmnist-tune-allconv", "allconv", 6161), ("fmnist-tune-resnet", "resnet", 7373)])
def test_shipped_tuning_candidates_are_what_the_recipe_trained(name, arch, seed, fmnist_test):
    net, meta = load_domain_net(name)
    assert net.config.arch == arch and json.loads(meta["settings"])["seed"] == seed
    assert f"--arch {arch}" in meta["command"] and f"--seed {seed}" in meta["command"]
    images, labels = fmnist_test
    accuracy, near_ties = accuracy_and_near_ties(net, images, labels)
    assert abs(accuracy - float(meta["test_accuracy"])) <= near_ties / len(images) + 1e-12
    # the assets README states each one's accuracy (the file's own record, rounded)
    assert f"| {float(meta['test_accuracy']):.4f} |" in (SHIPPED[name].parent / "README.md").read_text()
