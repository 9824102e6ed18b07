"""The controls that boosting must beat: unsharp masking, a norm-matched random edit, Gaussian blur."""

import pytest
import torch

from cmboost.boosting.controls import UnsharpControl, gaussian_blur, l2_change, random_perturbation, unsharp_mask
from cmboost.errors import UserInputError


def images(n=5, seed=0, size=16):
    g = torch.Generator().manual_seed(seed)
    return 0.2 + 0.6 * torch.rand(n, 1, size, size, generator=g)


def test_blur_keeps_constant_images_and_sums_to_one():
    flat = torch.full((2, 3, 9, 9), 0.37)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat, atol=1e-6)
    x = images()
    assert gaussian_blur(x, 1.0).mean().item() == pytest.approx(x.mean().item(), abs=0.02)
    assert gaussian_blur(x, 1.0).std() < x.std()  # it smooths


def test_unsharp_zero_amount_is_identity_and_positive_amount_adds_detail():
    x = images()
    assert torch.equal(unsharp_mask(x, UnsharpControl(amount=0.0)), x)
    detail = x - gaussian_blur(x, 1.0)
    sharpened = unsharp_mask(x, UnsharpControl(amount=0.5, sigma=1.0))
    assert torch.allclose(sharpened, (x + 0.5 * detail).clamp(0, 1), atol=1e-6)
    with pytest.raises(UserInputError, match="amount"):
        UnsharpControl(amount=float("nan"))


def test_random_edit_has_the_asked_norm_and_is_per_sample():
    x = images(6)
    norms = torch.tensor([0.1, 0.5, 1.0, 2.0, 0.0, 0.3])
    edited = random_perturbation(x, norms, seed=3)
    assert torch.allclose(l2_change(x, edited).float(), norms, atol=1e-3)
    # one stream per sample: the same image index gives the same edit in any batch
    part = random_perturbation(x[2:4], norms[2:4], seed=3, indices=[2, 3])
    assert torch.equal(part, edited[2:4])
    assert not torch.equal(random_perturbation(x, norms, seed=4), edited)


def test_random_edit_stays_in_bounds_and_saturated_images_keep_the_longest_move():
    x = torch.ones(2, 1, 4, 4)
    edited = random_perturbation(x, torch.tensor([100.0, 0.5]), seed=0)
    assert edited.min() >= 0 and edited.max() <= 1
    assert l2_change(x, edited)[1].item() == pytest.approx(0.5, abs=1e-3)
