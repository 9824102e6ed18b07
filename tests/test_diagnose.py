"""`cmboost diagnose`: its readings on a problem whose answer is known, its pieces by hand, the command
line on the shipped networks, and bad input.

The known answer: two classes of Gaussian images with a shared covariance, where a smooth pattern
separates the classes robustly but not perfectly (a wide spread along it) and four corner pixels
separate them perfectly but only by a small L2 distance (almost no spread along them): the robust and
non-robust features of Tsipras et al. (2019). A plainly trained classifier leans on the corners, an
adversarially trained one on the smooth pattern. The exact noised class-conditional score,
-(Sigma + sigma^2 I)^-1 (x - mu_y), weights each direction by 1 / (its variance + sigma^2): at small
sigma the low-variance corners dominate it, at large sigma the smooth pattern does. So the plain net
must align better at small sigma, the robust one at large sigma (Srinivas et al. 2023: robust models'
gradients agree with the score of the noised data), and the robust one must keep its accuracy under
attack where the plain one loses it.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cmboost
from _edm_teacher import random_edm_teacher
from cmboost.jcd.attacks import PGD
from cmboost.cli import main as cli_main
from cmboost.cm.denoiser import EDM_PRECOND, SIGMA_DATA
from cmboost.diagnostic.report import JSON_NAME, PNG_NAME
from cmboost.diagnostic.measures import DenoiserScore, DiagnoseSettings, gradient_score_cosines, rank_auc, robust_accuracy, summary
from cmboost.diagnostic.report import REPORT_KEYS
from cmboost.jcd.model import log_prob_from_logits
from cmboost.files.samples import save_samples

ASSETS = Path(cmboost.__file__).parent / "assets" / "fmnist"
JCD = ASSETS / "jcd-joint-w24.safetensors"


# ----------------------------------------------------------------------------- the known answer

class GaussianClasses:
    """Two classes in 1x8x8 images: mu_y = 0.5 +- (A v + DELTA h), covariance S^2 on every direction
    but v (smooth, variance S^2 + TAU^2) and h (the four corners, variance SH^2)."""

    H, A, TAU, DELTA, SH, S = 8, 0.5, 0.5, 0.1, 0.01, 0.05

    def __init__(self):
        yy, xx = torch.meshgrid(torch.arange(self.H).float(), torch.arange(self.H).float(), indexing="ij")
        h = torch.zeros(self.H, self.H)
        h[0, 0] = h[0, -1] = h[-1, 0] = h[-1, -1] = 1.0
        h = h / h.norm()
        v = torch.cos(torch.pi * (xx + 0.5) / self.H) + 0.5 * torch.cos(torch.pi * (yy + 0.5) / self.H)
        v = v - (v * h).sum() * h
        self.v, self.h = v / v.norm(), h
        offset = self.A * self.v + self.DELTA * self.h
        self.mu = torch.stack([0.5 + offset, 0.5 - offset])[:, None]  # [2, 1, H, H]
        self.var_v, self.var_h = self.S ** 2 + self.TAU ** 2, self.SH ** 2

    def _along(self, x, u):
        return (x * u).sum((2, 3), keepdim=True) * u

    def draw(self, n: int, generator: torch.Generator):
        y = torch.arange(n) % 2
        z = self.S * torch.randn(n, 1, self.H, self.H, generator=generator)
        z = z - self._along(z, self.v) - self._along(z, self.h)
        z = z + self.var_v ** 0.5 * torch.randn(n, 1, 1, 1, generator=generator) * self.v
        z = z + self.SH * torch.randn(n, 1, 1, 1, generator=generator) * self.h
        return (self.mu[y] + z).clamp(0, 1), y

    def between(self, n: int, generator: torch.Generator):
        """Images part of the way from their class's mean toward the other's (what a poor generator
        makes): there the score points back to the class, and says which features the class is made of."""
        y = torch.arange(n) % 2
        t = 0.2 + 0.6 * torch.rand(n, 1, 1, 1, generator=generator)
        return (1 - t) * self.mu[y] + t * self.mu[1 - y], y

    def score(self, x: torch.Tensor, sigma: float, y: torch.Tensor) -> torch.Tensor:
        """grad_x log p_sigma(x | y), exactly."""
        r = self.mu[y] - x
        rv, rh = self._along(r, self.v), self._along(r, self.h)
        return (r - rv - rh) / (self.S ** 2 + sigma ** 2) + rv / (self.var_v + sigma ** 2) + rh / (self.var_h + sigma ** 2)


def train(problem: GaussianClasses, adversarial: bool, seed: int = 0, steps: int = 400, eps: float = 0.5):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Flatten(), nn.Linear(problem.H ** 2, 64), nn.ReLU(), nn.Linear(64, 2))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    attack = PGD("l2", eps, 2.5 * eps / 5, 5)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = problem.draw(64, generator)
        if adversarial:
            x = attack(net, lambda z: -log_prob_from_logits(net(z), y), x)
        loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return net.eval()


@pytest.fixture(scope="module")
def gaussian():
    problem = GaussianClasses()
    return problem, train(problem, adversarial=False), train(problem, adversarial=True)


def test_robust_net_aligns_with_the_noised_score_and_the_plain_one_with_the_sharp_score(gaussian):
    problem, plain, robust = gaussian
    x, y = problem.between(200, torch.Generator().manual_seed(1))
    sigmas = (0.05, 0.5)
    cos = {name: gradient_score_cosines(net, problem.score, x, y, sigmas, batch_size=64).mean(1)
           for name, net in (("plain", plain), ("robust", robust))}
    # measured: plain 0.97, 0.40; robust 0.24, 0.97
    assert cos["robust"][1] > cos["plain"][1] + 0.3, cos
    assert cos["robust"][1] > 0.9, cos
    assert cos["plain"][0] > cos["robust"][0] + 0.2, cos


def test_robust_net_keeps_its_accuracy_under_attack(gaussian):
    problem, plain, robust = gaussian
    x, y = problem.draw(200, torch.Generator().manual_seed(2))
    rows = {name: robust_accuracy(net, x, y, (0.25,), steps=20, batch_size=64)[0]["accuracy"]
            for name, net in (("plain", plain), ("robust", robust))}
    # measured: plain 0.00, robust 0.63 (clean: 1.00 and 0.81)
    assert rows["robust"] > rows["plain"] + 0.3, rows


# ----------------------------------------------------------------------------- the pieces by hand

def brute_auc(pos, neg):
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_rank_auc_equals_the_pairwise_count_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        pos, neg = rng.integers(0, 6, rng.integers(1, 30)), rng.integers(0, 6, rng.integers(1, 30))
        assert rank_auc(pos, neg) == pytest.approx(brute_auc(pos, neg), abs=1e-12)
    assert rank_auc([3, 4], [1, 2]) == 1.0 and rank_auc([1, 2], [3, 4]) == 0.0
    assert rank_auc([1, 2, 3], [1, 2, 3]) == 0.5


def test_summary_leaves_out_undefined_cosines():
    assert summary(np.array([0.5, np.nan, 1.0])) == {"mean": 0.75, "std": 0.25, "num": 2, "undefined": 1}


class ZeroNet(nn.Module):
    def forward(self, x, t, y):
        return torch.zeros_like(x)


def test_teacher_score_of_a_zero_network_is_the_gaussian_score():
    """With F = 0 the EDM denoiser is c_skip x, the exact denoiser of N(0, sigma_data^2 I) data, whose
    noised score is -x / (sigma_data^2 + sigma^2) in the teacher's [-1, 1] units (times 2 in [0, 1] pixels)."""
    score = DenoiserScore(ZeroNet(), EDM_PRECOND)
    x = torch.rand(3, 1, 4, 4)
    for sigma in (0.1, 0.5):
        expected = 2 * -(2 * x - 1) / (SIGMA_DATA ** 2 + sigma ** 2)
        torch.testing.assert_close(score(x, sigma, torch.zeros(3, dtype=torch.long)), expected)


def test_settings_check_themselves():
    from cmboost.errors import UserInputError

    assert DiagnoseSettings(attack_eps=[1, 2]).attack_eps == (1.0, 2.0)
    for bad, flag in (({"sigmas": (0.1, 0.0)}, "--sigmas"), ({"attack_eps": (float("nan"),)}, "--attack-eps"),
                      ({"pag_eps": -1.0}, "--pag-eps"), ({"num_real": 0}, "--num-real"), ({"seed": -1}, "--seed")):
        with pytest.raises(UserInputError, match=flag):
            DiagnoseSettings(**bad)


# ----------------------------------------------------------------------------- the command line

TINY = ["--num-real", "16", "--num-samples", "8", "--attack-eps", "0.5", "2", "--attack-steps", "2",
        "--pag-steps", "2", "--pag-rows", "1", "--steps", "2", "--device", "cpu", "--batch-size", "8"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Eight CT samples, a random-weight EDM teacher of the same shape, and an unlabelled copy."""
    from cmboost.cm.sample import SampleRun, sample

    root = tmp_path_factory.mktemp("diagnose")
    samples = sample(SampleRun(model=str(ASSETS / "ct.safetensors"), out=str(root / "ct.npz"), num=8, progress=False))
    teacher = random_edm_teacher(root / "edm.safetensors", num_classes=10, channels=1, size=32)
    with np.load(samples) as f:
        unlabelled = save_samples(root / "unlabelled.npz", f["arr_0"].transpose(0, 3, 1, 2).copy())
    return {"samples": samples, "teacher": teacher, "unlabelled": unlabelled}


def run_cli(capsys, argv):
    code = cli_main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_on_the_shipped_networks_writes_the_report_and_picture(inputs, tmp_path, capsys):
    # the shipped settings were tuned for the demo's booster: used for JCD all the same, and recorded so
    base = ["diagnose", "--model", JCD, "--samples", f"ct1={inputs['samples']}", "--teacher", inputs["teacher"],
            "--settings", ASSETS / "tuned-ct1.json", "--allow-other-network", *TINY]
    code, out, err = run_cli(capsys, base + ["--out", tmp_path / "a"])
    assert code == 0, err
    report = json.loads((tmp_path / "a" / JSON_NAME).read_text())
    assert list(report) == list(REPORT_KEYS)
    tuned_for = json.loads((ASSETS / "tuned-ct1.json").read_text())["fingerprint"]["model"]
    assert report["provenance"]["settings_tuned_for_other_network"] == {str(ASSETS / "tuned-ct1.json"): tuned_for}
    assert sum("tuned for the network" in line for line in out.splitlines()) == 1
    assert set(report["accuracy"]) == {"clean", "robust", "attack"}
    assert [row["eps"] for row in report["accuracy"]["robust"]] == [0.5, 2.0]
    gen = report["realness"]["generators"]["ct1"]
    tuned = json.loads((ASSETS / "tuned-ct1.json").read_text())["best"]
    assert gen["method"] == tuned and gen["hyper"]["steps"] == 2 and gen["num"] == 8  # tuned, --steps overrides
    for when in ("before", "after"):
        assert set(gen[when]) == {"auc", "mean_realness", "mean_p_y", "accuracy"} and 0 <= gen[when]["auc"] <= 1
    alignment = report["alignment"]
    assert alignment["sigmas"] == [0.1, 0.25, 0.5] and str(inputs["teacher"]) in alignment["score"]
    for rows in (alignment["real"], alignment["generators"]["ct1"]["before"], alignment["generators"]["ct1"]["after"]):
        assert [r["sigma"] for r in rows] == alignment["sigmas"]
        assert all(set(r) == {"sigma", "mean", "std", "num", "undefined"} and -1 <= r["mean"] <= 1 for r in rows)
    pag = report["pag"]
    assert pag["rows"][0] == "grey" and len(pag["rows"]) == 2 and len(pag["columns"]) == 11
    assert int(pag["rows"][1].split()[1]) >= 55000  # named by its index in the training split
    assert np.array(pag["target_prob"]).shape == (2, 10)
    from PIL import Image

    with Image.open(tmp_path / "a" / PNG_NAME) as png:
        assert png.size[0] > png.size[1] > 0
    assert "wrote" in out and "realness AUC" in out

    # Deterministic: the same command gives the same report, byte for byte, and the same picture.
    assert run_cli(capsys, base + ["--out", tmp_path / "b"])[0] == 0
    assert (tmp_path / "a" / JSON_NAME).read_bytes() == (tmp_path / "b" / JSON_NAME).read_bytes()
    assert (tmp_path / "a" / PNG_NAME).read_bytes() == (tmp_path / "b" / PNG_NAME).read_bytes()


BAD = [  # (extra flags, text the one line must hold)
    (["--attack-eps", "-1"], "--attack-eps"),
    (["--sigmas", "0.1", "nan"], "--sigmas"),
    (["--pag-steps", "0"], "--pag-steps"),
    (["--steps", "-1"], "--steps"),
    (["--samples", "{missing}"], "missing.npz"),
    (["--samples", "{unlabelled}"], "--samples"),
    (["--samples", "{samples}", "--settings", "{settings}", "--settings", "{settings}"], "--settings"),
    (["--teacher", "{ct}"], "--teacher"),
    (["--real", "{unlabelled}"], "--real"),
]


@pytest.mark.parametrize("extra, named", BAD, ids=[" ".join(e[:2]) for e, _ in BAD])
def test_bad_input_is_one_line_and_writes_nothing(extra, named, inputs, tmp_path, capsys):
    values = {"missing": tmp_path / "missing.npz", "unlabelled": inputs["unlabelled"], "samples": inputs["samples"],
              "settings": ASSETS / "tuned-ct1.json", "ct": ASSETS / "ct.safetensors"}
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, ["diagnose", "--model", JCD, *TINY, "--out", out,
                                    *[e.format(**values) for e in extra]])
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert named in err, err
    assert not out.exists()


def test_an_existing_report_is_kept_without_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / JSON_NAME).write_text("mine\n")
    code, _, err = run_cli(capsys, ["diagnose", "--model", JCD, *TINY, "--out", out])
    assert code == 2 and "already exists" in err and err.count("\n") == 1, err
    assert (out / JSON_NAME).read_text() == "mine\n" and sorted(p.name for p in out.iterdir()) == [JSON_NAME]


def test_a_do_not_boost_settings_file_is_diagnosed_with_its_choosing_halfs_candidate(tmp_path):
    """The diagnostic needs an edit to measure; a file whose choice was not confirmed still names one."""
    from cmboost.diagnostic.diagnose import DiagnoseRun, boost_choices

    settings = json.loads((ASSETS / "tuned-ct1.json").read_text())
    settings.update(best="none", choice="pgd", decision={"best": "none", "reason": "pgd: not confirmed"})
    path = tmp_path / "none.json"
    path.write_text(json.dumps(settings))
    run = DiagnoseRun(model=str(JCD), out=str(tmp_path / "d"), samples=(("ct1", "x.npz"),), settings_files=(str(path),))
    [(method, hyper)] = boost_choices(run, 1)
    assert method == "pgd" and hyper["eps"] == settings["methods"]["pgd"]["hyper"]["eps"]
    named = DiagnoseRun(model=str(JCD), out=str(tmp_path / "d"), samples=(("ct1", "x.npz"),),
                        settings_files=(str(path),), method="sgld")
    assert boost_choices(named, 1)[0][0] == "sgld"
