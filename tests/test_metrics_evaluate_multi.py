"""The one report: density/coverage in the fixed keys, several feature networks (fd_<name>) against
.npz and EDM2-style .pkl references, and the evaluate / evaluate-ref verbs. DINOv2 runs with small
random weights (the real ViT-L/14 file could not be downloaded here)."""

import json
import os
import pickle

import numpy as np
import pytest
import torch

from cmboost.cli import main
from cmboost.files.datasets import fashion_mnist
from cmboost.files.samples import save_samples
from cmboost.errors import UserInputError
from cmboost.metrics.domain_net import DomainNet, DomainNetConfig, save_domain_net
from cmboost.metrics.dinov2 import DINOV2_FILE, ViTConfig, random_dinov2
from cmboost.metrics.evaluate import DC_KEYS, KID_KEYS, METRIC_KEYS, evaluate_images, extract_features
from cmboost.files.samples import ArraySource
from cmboost.metrics.features import DinoV2Features, load_feature_extractor
from cmboost.metrics.ref_pickle import save_pickled_references
from cmboost.metrics.reference import reference_stats
from cmboost.metrics.stats import frechet_distance
from cmboost.metrics.knn import density_coverage

SMALL = ViTConfig(dim=64, depth=1, mlp_hidden=128)


@pytest.fixture(scope="module")
def fmnist():
    torch.set_num_threads(1)
    return fashion_mnist("test")[0][:, None]


@pytest.fixture(scope="module")
def domain():
    return load_feature_extractor("fmnist", device="cpu")


@pytest.fixture(scope="module")
def dino():
    return DinoV2Features(random_dinov2(SMALL, seed=0), "dinov2-test-small")


@pytest.fixture(scope="module")
def reference(fmnist, domain):
    return reference_stats(fmnist[:500], domain, batch_size=128, num_features=300, seed=0, source="test[:500]")


def _statistics(images, extractor):
    feats = extract_features(ArraySource(images, "x"), extractor, 64, keep_probs=False)
    return feats.mu, feats.sigma, feats.pool


def test_density_and_coverage_follow_kid_and_equal_the_metric_on_the_kept_features(fmnist, domain, reference):
    samples = fmnist[600:900]
    result = evaluate_images(samples, reference, domain, batch_size=100)
    assert list(result)[:9] == list(METRIC_KEYS + KID_KEYS + DC_KEYS)
    assert not any(key.startswith("fd_") for key in result)  # one network: no fd_ keys
    _, _, pool = _statistics(samples, domain)
    expected = density_coverage(reference.features, pool, k=3)
    assert result["density"] == pytest.approx(expected[0], abs=1e-9)
    assert result["coverage"] == pytest.approx(expected[1], abs=1e-9)
    assert 0.5 < result["density"] < 2.0 and 0.5 < result["coverage"] <= 1.0  # same distribution
    collapsed = evaluate_images(np.repeat(samples[:5], 60, axis=0), reference, domain, batch_size=100)
    assert collapsed["coverage"] < 0.2 < result["coverage"]
    for batch_size in (37, 300):  # invariant to the batching of the samples
        other = evaluate_images(samples, reference, domain, batch_size=batch_size)
        assert other["density"] == pytest.approx(result["density"], abs=1e-3)
        assert other["coverage"] == pytest.approx(result["coverage"], abs=1e-3)


def test_several_networks_add_their_frechet_distances(fmnist, domain, dino, reference, tmp_path):
    mu, sigma, _ = _statistics(fmnist[:500], dino)
    pkl = save_pickled_references(tmp_path / "ref.pkl", [("dinov2", dino.identity, mu, sigma)], count=500)
    samples = fmnist[600:800]
    result = evaluate_images(samples, [reference, str(pkl)], [domain, dino], batch_size=64)
    keys = list(result)
    assert keys[:11] == list(METRIC_KEYS + KID_KEYS + DC_KEYS) + ["fd_fmnist", "fd_dinov2"]
    assert result["fd_fmnist"] == result["fid"] and result["fd_feature_nets"]["fd_dinov2"] == "dinov2-test-small"
    s_mu, s_sigma, _ = _statistics(samples, dino)
    assert result["fd_dinov2"] == pytest.approx(frechet_distance(mu, sigma, s_mu, s_sigma), rel=1e-9)
    alone = evaluate_images(samples, reference, domain, batch_size=64)
    for key in METRIC_KEYS + KID_KEYS + DC_KEYS:  # the second network changes none of the first one's numbers
        assert result[key] == alone[key]
    # no reference for the second network: its FD is n/a with a note, the rest stands
    missing = evaluate_images(samples, reference, [domain, dino], batch_size=64)
    assert missing["fd_dinov2"] is None and "evaluate-ref --features dinov2" in missing["notes"]["fd_dinov2"]
    with pytest.raises(UserInputError, match="--ref: none of .* was made with --features dinov2"):
        evaluate_images(samples, [reference, reference], dino)
    with pytest.raises(UserInputError, match="listed twice"):
        evaluate_images(samples, reference, [domain, "fmnist"])


def test_dinov2_alone_has_no_inception_score_but_every_distance(fmnist, dino):
    ref = reference_stats(fmnist[:200], dino, batch_size=100, num_features=150)
    result = evaluate_images(fmnist[300:400], ref, dino, batch_size=50)
    assert result["is"] is None and "no classifier" in result["notes"]["is"]
    assert result["sfid"] is None and all(isinstance(result[k], float) for k in ("fid", "precision", "coverage"))


def _folder(root, images):
    from PIL import Image

    for i, image in enumerate(images):
        folder = root / f"class{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(folder / f"{i:04d}.png")
    return root


def test_cli_evaluate_ref_writes_both_formats_and_evaluate_reads_them(tmp_path, fmnist, capsys, monkeypatch):
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(random_dinov2(SMALL, seed=1).state_dict(), hub / DINOV2_FILE)  # the hub layout, random values
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CMBOOST_OFFLINE", "1")
    monkeypatch.delenv("CMBOOST_WEIGHTS", raising=False)
    torch.manual_seed(0)  # a tiny RGB domain net: folder data are read as RGB
    rgb = save_domain_net(tmp_path / "rgb.safetensors", DomainNet(DomainNetConfig(
        in_channels=3, widths=(4, 8, 8, 8), feature_dim=16)).eval())
    both = f"{rgb},dinov2"
    data = f"folder:{_folder(tmp_path / 'data', fmnist[:120])}"
    common = ["--data", data, "--device", "cpu", "--quiet", "--batch-size", "40"]
    assert main(["evaluate-ref", *common, "--features", str(rgb), "--num-features", "100",
                 "--out", str(tmp_path / "ref.npz")]) == 0
    assert main(["evaluate-ref", *common, "--features", both, "--out", str(tmp_path / "ref.pkl")]) == 0
    plain = pickle.loads((tmp_path / "ref.pkl").read_bytes())  # EDM2's layout, as its tools read it
    assert plain["num_images"] == 120 and set(plain) == {"num_images", "fd_rgb", "fd_dinov2", "feature_nets"}
    assert plain["fd_dinov2"]["mu"].shape == (64,) and plain["fd_dinov2"]["sigma"].dtype == np.float64
    capsys.readouterr()
    assert main(["evaluate-ref", *common, "--features", both, "--out", str(tmp_path / "two.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "two.npz: an .npz reference holds one feature network" in err

    samples = save_samples(tmp_path / "s.npz", np.repeat(fmnist[200:300], 3, axis=1))
    out = tmp_path / "m.json"
    assert main(["evaluate", str(samples), "--ref", f"{tmp_path / 'ref.npz'},{tmp_path / 'ref.pkl'}",
                 "--features", both, "--json", str(out), "--device", "cpu", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "Density" in printed and "Coverage" in printed and "FD dinov2" in printed
    result = json.loads(out.read_text())
    assert list(result)[:11] == list(METRIC_KEYS + KID_KEYS + DC_KEYS) + ["fd_rgb", "fd_dinov2"]
    assert result["precision"] is not None and result["fd_dinov2"] > 0  # PR from the .npz, FD_DINOv2 from the .pkl
    with_pkl_first = tmp_path / "m2.json"
    assert main(["evaluate", str(samples), "--ref", str(tmp_path / "ref.pkl"), "--ref", str(tmp_path / "ref.npz"),
                 "--features", both, "--json", str(with_pkl_first), "--device", "cpu", "--quiet"]) == 0
    assert json.loads(with_pkl_first.read_text())["precision"] == result["precision"]

    # the old spelling still makes a reference
    assert main(["evaluate", "ref", *common, "--features", str(rgb), "--num-features", "50",
                 "--out", str(tmp_path / "old.npz")]) == 0


def test_cli_refuses_a_malicious_reference_pickle_without_running_it(tmp_path, fmnist, capsys):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    evil = tmp_path / "img64.pkl"
    evil.write_bytes(pickle.dumps({"fid": {"mu": np.zeros(2), "sigma": np.eye(2)}, "x": Payload()}))
    samples = save_samples(tmp_path / "s.npz", fmnist[:20])
    assert main(["evaluate", str(samples), "--ref", str(evil), "--device", "cpu", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(evil) in err and "refused to unpickle" in err
    assert not marker.exists()
