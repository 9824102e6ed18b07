"""Preconditioning and samplers against hand computations of docs/method.md §5 on a toy network."""

import math

import numpy as np
import pytest
import torch

from cmboost.cm.denoiser import (CM_PRECOND, EDM_PRECOND, Denoiser, denoise, heun, heun_step, karras_sigma,
                                 multistep, onestep)
from cmboost.runtime import sample_generators


class Toy(torch.nn.Module):
    """F(x, t, y) = 0.3 x + 0.001 t + 0.1 y: affine, so every step can be written out by hand."""

    def forward(self, x, t, y):
        return 0.3 * x + 0.001 * t.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1).float()


def hand_cm_denoise(x, s, y, clip=True):
    sd, smin = 0.5, 0.002
    c_skip = sd ** 2 / ((s - smin) ** 2 + sd ** 2)
    c_out = (s - smin) * sd / math.sqrt(s ** 2 + sd ** 2)
    c_in = 1 / math.sqrt(s ** 2 + sd ** 2)
    t = 250 * math.log(s + 1e-44)
    out = c_skip * x + c_out * (0.3 * c_in * x + 0.001 * t + 0.1 * y.view(-1, 1, 1, 1).double())
    return out.clamp(-1, 1) if clip else out


def test_scalings_match_formulas():
    s = torch.tensor([0.002, 1.0, 80.0])
    c_skip, c_out, c_in = CM_PRECOND.scalings(s)
    assert c_skip[0] == pytest.approx(1.0) and c_out[0] == pytest.approx(0.0)  # boundary: D(x, smin) = x
    assert c_skip[1].item() == pytest.approx(0.25 / (0.998 ** 2 + 0.25))
    assert c_out[2].item() == pytest.approx(79.998 * 0.5 / math.sqrt(6400.25))
    assert c_in[1].item() == pytest.approx(1 / math.sqrt(1.25))
    e_skip, e_out, _ = EDM_PRECOND.scalings(s)
    assert e_skip[1].item() == pytest.approx(0.25 / 1.25) and e_out[1].item() == pytest.approx(0.5 / math.sqrt(1.25))
    assert CM_PRECOND.time_input(torch.tensor([1.0])).item() == pytest.approx(0.0)
    assert CM_PRECOND.time_input(torch.tensor([80.0])).item() == pytest.approx(250 * math.log(80))


def test_denoise_and_onestep_by_hand():
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    got = denoise(Toy(), x.float(), 0.7, y, CM_PRECOND)
    torch.testing.assert_close(got.double(), hand_cm_denoise(x, 0.7, y, clip=False), atol=1e-5, rtol=1e-5)
    den = Denoiser(Toy(), CM_PRECOND, torch.device("cpu"))
    z = torch.randn(3, 1, 4, 4)
    torch.testing.assert_close(onestep(den, z, y).double(), hand_cm_denoise(80 * z.double(), 80.0, y),
                               atol=1e-5, rtol=1e-5)


def test_karras_grid():
    assert karras_sigma(0, 40) == pytest.approx(80.0)
    assert karras_sigma(39, 40) == pytest.approx(0.002)
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    assert karras_sigma(22, 40) == pytest.approx((a + 22 / 39 * (b - a)) ** 7)


@pytest.mark.parametrize("n", [2, 18, 41, 201])
def test_karras_grid_both_orders(n):
    # the sampler's order (Python floats, sigma_max first) and the losses' (a float64 tensor, sigma_min first)
    desc = torch.tensor([karras_sigma(i, n) for i in range(n)], dtype=torch.float64)
    asc = karras_sigma(torch.arange(n, dtype=torch.float64), n, ascending=True)
    assert asc.dtype == torch.float64 and isinstance(karras_sigma(0, n), float)
    assert desc[0].item() == pytest.approx(80.0, rel=1e-12) and desc[-1].item() == pytest.approx(0.002, rel=1e-12)
    assert asc[0].item() == pytest.approx(0.002, rel=1e-12) and asc[-1].item() == pytest.approx(80.0, rel=1e-12)
    torch.testing.assert_close(asc, desc.flip(0), rtol=1e-12, atol=0)
    assert (asc.diff() > 0).all()


def test_heun_step_scalar_and_per_sample_times():
    # D(x, t) = x / 2 makes dx/dt = x / (2t): Euler gives x (1 + h / (2 t0)), Heun averages both slopes
    x = torch.randn(3, 1, 2, 2)
    den = lambda z, t, y: 0.5 * z  # noqa: E731
    t0, t1 = 2.0, 1.5
    euler = x * (1 + (t1 - t0) / (2 * t0))
    heun_x = x + (t1 - t0) * 0.5 * (x / (2 * t0) + euler / (2 * t1))
    torch.testing.assert_close(heun_step(den, x, t0, t1, None, correct=False), euler)
    torch.testing.assert_close(heun_step(den, x, t0, t1, None), heun_x)
    per_sample = heun_step(den, x, torch.full((3,), t0), torch.full((3,), t1), None)
    torch.testing.assert_close(per_sample, heun_x)


@pytest.mark.parametrize("ts,n", [((0, 22, 39), 40), ((0, 106, 200), 201), ((0, 2, 3), 5)])
def test_multistep_by_hand(ts, n):
    y = torch.tensor([3, 1])
    z = torch.randn(2, 1, 3, 3)
    den = Denoiser(Toy(), CM_PRECOND, torch.device("cpu"))
    got = multistep(den, z, y, ts, n, sample_generators(7, [10, 11]))
    # by hand: x = 80 z; per step x0 = D(x, t_i); x = x0 + z_i sqrt(t_{i+1}^2 - smin^2)
    gens = sample_generators(7, [10, 11])
    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    x = 80 * z.double()
    for cur, nxt in zip(ts[:-1], ts[1:]):
        t = (a + cur / (n - 1) * (b - a)) ** 7
        t_next = min(max((a + nxt / (n - 1) * (b - a)) ** 7, 0.002), 80.0)
        x0 = hand_cm_denoise(x, t, y)
        if t_next ** 2 - 0.002 ** 2 > 0:
            noise = torch.stack([torch.randn(1, 3, 3, generator=g) for g in gens]).double()
            x = x0 + noise * math.sqrt(t_next ** 2 - 0.002 ** 2)
        else:
            x = x0
    torch.testing.assert_close(got.double(), x, atol=1e-4, rtol=1e-4)
    if ts[-1] == n - 1:
        assert got.abs().max() <= 1.0  # the last step lands on smin: a clipped x0, no noise


def test_heun_by_hand():
    y = torch.tensor([1])
    z = torch.randn(1, 1, 2, 2)
    den = Denoiser(Toy(), EDM_PRECOND, torch.device("cpu"), clip=False)
    got = heun(den, z, y, num_steps=3)

    def d_edm(x, s):
        c_skip, c_out, c_in = 0.25 / (s * s + 0.25), s * 0.5 / math.sqrt(s * s + 0.25), 1 / math.sqrt(s * s + 0.25)
        return c_skip * x + c_out * (0.3 * c_in * x + 0.001 * 250 * math.log(s) + 0.1)

    a, b = 80 ** (1 / 7), 0.002 ** (1 / 7)
    sig = [(a + i / 2 * (b - a)) ** 7 for i in range(3)] + [0.0]
    x = 80 * z.double()
    for s, s_next in zip(sig[:-1], sig[1:]):
        d = (x - d_edm(x, s)) / s
        xn = x + (s_next - s) * d
        if s_next > 0:
            xn = x + (s_next - s) * 0.5 * (d + (xn - d_edm(xn, s_next)) / s_next)
        x = xn
    torch.testing.assert_close(got.double(), x, atol=1e-4, rtol=1e-4)


def test_denoiser_bf16_returns_fp32():
    den = Denoiser(Toy(), CM_PRECOND, torch.device("cpu"), precision="bf16")
    out = den(torch.randn(2, 1, 2, 2), 1.0, torch.tensor([0, 1]))
    assert out.dtype == torch.float32


def test_sample_batch_is_batch_size_invariant():
    from cmboost.cm.checkpoint import LoadedModel
    from cmboost.cm.sample import SamplerChoice, sample_batch
    from cmboost.cm.unet import UNetModel

    torch.manual_seed(0)
    net = UNetModel(image_size=8, in_channels=1, model_channels=8, out_channels=1, num_res_blocks=1,
                    attention_resolutions=(2,), channel_mult=(1, 2), num_classes=4, num_head_channels=8,
                    use_scale_shift_norm=True, resblock_updown=True).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    loaded = LoadedModel(net, "cd", CM_PRECOND, (0, 22, 39), 40, 8, 1, 4, "test", {})
    choice = SamplerChoice("multistep", 2, (0, 22, 39), 40)
    idx = list(range(7))
    whole, labels = sample_batch(loaded, choice, idx, 5, torch.device("cpu"))
    pieces = [sample_batch(loaded, choice, part, 5, torch.device("cpu")) for part in ([0, 1], [2, 3, 4], [5], [6])]
    torch.testing.assert_close(torch.cat([p[0] for p in pieces]), whole, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.cat([p[1] for p in pieces]), labels)
    assert len(set(labels.tolist())) > 1 and not torch.allclose(whole[0], whole[1])
    # a different seed gives different samples; restricting labels does not change the noise stream
    other, _ = sample_batch(loaded, choice, idx, 6, torch.device("cpu"))
    assert not torch.allclose(other, whole)
    fixed, fixed_labels = sample_batch(loaded, choice, idx, 5, torch.device("cpu"), class_labels=[2])
    assert set(fixed_labels.tolist()) == {2}
    np.testing.assert_array_equal(np.isfinite(fixed.numpy()), True)
