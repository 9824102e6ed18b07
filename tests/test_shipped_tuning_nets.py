"""The shipped tuning committee's nets are what the recipe trained: architecture, seed, command, and the test accuracy they record."""

import pytest

from _shipped_nets import check_shipped_candidate, fmnist_test_split


@pytest.fixture(scope="module")
def fmnist_test():
    return fmnist_test_split()


@pytest.mark.parametrize("name, arch, seed", [("fmnist-tune-allconv", "allconv", 6161), ("fmnist-tune-resnet", "resnet", 7373)])
def test_shipped_tuning_candidates_are_what_the_recipe_trained(name, arch, seed, fmnist_test):
    check_shipped_candidate(name, arch, seed, *fmnist_test)
