"""The evaluation pipeline and the `cmboost evaluate` / `cmboost train-features` verbs, on small
Fashion-MNIST subsets with the shipped domain net (and a random-weight Inception for the sFID path)."""

import json

import numpy as np
import pytest
import torch

from cmboost.cli import main
from cmboost.files.datasets import fashion_mnist, pad_to
from cmboost.files.samples import load_samples, save_samples
from cmboost.errors import UserInputError
from cmboost.metrics.domain_net import DomainNet, DomainNetConfig, save_domain_net
from cmboost.metrics.evaluate import METRIC_KEYS, evaluate_file, evaluate_images
from cmboost.files.samples import NpzSource
from cmboost.metrics.features import FeatureExtractor, InceptionFeatures, load_feature_extractor
from cmboost.metrics.reference import Reference, load_reference, reference_stats, save_reference
from cmboost.metrics.stats import frechet_distance


@pytest.fixture(scope="module")
def fmnist():
    torch.set_num_threads(1)
    images, labels = fashion_mnist("test")
    return images[:, None], labels


@pytest.fixture(scope="module")
def extractor():
    return load_feature_extractor("fmnist", device="cpu")


@pytest.fixture(scope="module")
def reference(fmnist, extractor):
    return reference_stats(fmnist[0][:600], extractor, batch_size=128, num_features=400, seed=0, source="test[:600]")


def test_reference_keeps_stats_of_all_and_features_of_a_subset(reference):
    assert reference.count == 600 and reference.features.shape == (400, 256)
    assert reference.images.shape == (400, 1, 28, 28) and reference.mu.shape == (256,)
    assert reference.mu_s is None and reference.feature_net.startswith("domain-net-")


def test_real_images_score_better_than_damaged_ones(fmnist, reference):
    real = fmnist[0][600:1000]
    good = evaluate_images(real, reference, "fmnist", batch_size=128)
    assert list(good)[:5] == list(METRIC_KEYS)
    assert good["sfid"] is None and "no spatial" in good["notes"]["sfid"]
    rng = np.random.default_rng(0)
    noisy = np.clip(real.astype(np.int16) + rng.integers(-90, 90, real.shape), 0, 255).astype(np.uint8)
    bad = evaluate_images(noisy, reference, "fmnist", batch_size=128)
    assert bad["fid"] > 3 * good["fid"]
    assert good["precision"] > 0.6 and good["recall"] > 0.6
    assert bad["precision"] < good["precision"]
    assert 5.0 < good["is"] <= 10.0  # 10 classes, balanced, confident
    collapsed = evaluate_images(real[fmnist[1][600:1000] == 1],
                                reference, "fmnist", batch_size=128)  # trousers only
    assert collapsed["recall"] < 0.3 and collapsed["is"] < 2.0


def test_results_invariant_to_batch_size_and_sample_order(fmnist, reference):
    real = fmnist[0][600:900]
    base = evaluate_images(real, reference, "fmnist", batch_size=300)
    other = evaluate_images(real, reference, "fmnist", batch_size=37)
    shuffled = evaluate_images(real[np.random.default_rng(1).permutation(len(real))], reference, "fmnist",
                               batch_size=64)
    for result in (other, shuffled):
        assert result["fid"] == pytest.approx(base["fid"], rel=1e-5)
        assert result["is"] == pytest.approx(base["is"], rel=1e-5)
        assert result["precision"] == pytest.approx(base["precision"], abs=1.5 / len(real))
        assert result["recall"] == pytest.approx(base["recall"], abs=1.5 / 400)


def test_reference_file_round_trip_and_recompute_from_arr_0(tmp_path, fmnist, reference):
    path = save_reference(tmp_path / "ref.npz", reference)
    loaded = load_reference(path)
    np.testing.assert_array_equal(loaded.sigma, reference.sigma)
    np.testing.assert_array_equal(loaded.images, reference.images)
    assert loaded.feature_net == reference.feature_net and loaded.count == 600
    with pytest.raises(UserInputError, match="already exists"):
        save_reference(path, reference)
    # a reference without stored features (OpenAI style) gets them from arr_0 at evaluation time
    bare = Reference(mu=reference.mu, sigma=reference.sigma, images=reference.images,
                     feature_net=reference.feature_net, source="bare")
    samples = fmnist[0][600:800]
    with_features = evaluate_images(samples, loaded, "fmnist", batch_size=100)
    without = evaluate_images(samples, bare, "fmnist", batch_size=100)
    for key in ("fid", "precision", "recall"):
        assert without[key] == pytest.approx(with_features[key], rel=1e-5, abs=1e-6)


def test_openai_reference_layout_is_read_and_checked(tmp_path, extractor):
    rng = np.random.default_rng(2)
    path = tmp_path / "VIRTUAL_tiny.npz"
    np.savez(path, arr_0=rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), mu=np.zeros(2048),
             sigma=np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    ref = load_reference(path)
    assert ref.images.shape == (6, 3, 8, 8) and ref.mu_s.shape == (2023,) and ref.features is None
    assert ref.net == "inception-v3-tf-2015-12-05"
    with pytest.raises(UserInputError, match="reference made with feature net inception"):
        ref.check_against(extractor)
    np.savez(tmp_path / "broken.npz", mu=np.zeros(3))
    with pytest.raises(UserInputError, match="'mu' without 'sigma'"):
        load_reference(tmp_path / "broken.npz")


def test_reference_of_another_domain_net_is_refused(tmp_path, fmnist, reference):
    torch.manual_seed(0)
    other = save_domain_net(tmp_path / "other.safetensors", DomainNet(DomainNetConfig()).eval())
    with pytest.raises(UserInputError, match="reference made with feature net domain-net-"):
        evaluate_images(fmnist[0][:10], reference, str(other))


class _SpatialStub(FeatureExtractor):
    """A tiny stand-in with spatial features (real Inception statistics need 2048-d square roots,
    ~16 s each on one core): pool = 4x4 average pool, spatial = 2x2 average pool, logits = 3 bins."""

    name, identity, pool_dim, num_classes, spatial_dim = "stub", "stub-net", 16, 3, 4

    def check_images(self, shape, source):
        if tuple(shape) != (1, 8, 8):
            raise UserInputError(f"{source}: stub takes 1x8x8")

    def __call__(self, images_u8):
        x = images_u8.float() / 255
        pool = torch.nn.functional.avg_pool2d(x, 2).flatten(1)
        spatial = torch.nn.functional.avg_pool2d(x, 4).flatten(1)
        return {"pool": pool, "logits": pool[:, :3] * 10, "spatial": spatial}


def test_spatial_features_give_sfid_end_to_end():
    rng = np.random.default_rng(3)
    stub = _SpatialStub()
    ref = reference_stats(rng.integers(0, 256, (300, 1, 8, 8), dtype=np.uint8), stub, batch_size=64)
    assert ref.mu_s.shape == (4,) and ref.features.shape == (300, 16)
    near = evaluate_images(rng.integers(0, 256, (200, 1, 8, 8), dtype=np.uint8), ref, stub, batch_size=50)
    far = evaluate_images(rng.integers(0, 128, (200, 1, 8, 8), dtype=np.uint8), ref, stub, batch_size=50)
    assert near["notes"] == {} and all(np.isfinite(near[k]) for k in METRIC_KEYS)
    assert far["sfid"] > 10 * near["sfid"] and far["fid"] > 10 * near["fid"]
    # the spatial statistics are the Frechet distance of the spatial features, nothing else
    samples = rng.integers(0, 256, (200, 1, 8, 8), dtype=np.uint8)
    spatial = stub(torch.from_numpy(samples))["spatial"].double().numpy()
    expected = frechet_distance(spatial.mean(0), np.cov(spatial, rowvar=False), ref.mu_s, ref.sigma_s)
    assert evaluate_images(samples, ref, stub)["sfid"] == pytest.approx(expected, rel=1e-9)


def test_inception_reference_has_sfid_statistics():
    inception = InceptionFeatures.random(seed=4, channels_last=True)
    images = np.random.default_rng(5).integers(0, 256, (3, 3, 16, 16), dtype=np.uint8)
    ref = reference_stats(images, inception, batch_size=2)
    assert ref.mu.shape == (2048,) and ref.mu_s.shape == (2023,) and ref.features.shape == (3, 2048)
    assert ref.feature_net == "inception-v3-tf-2015-12-05-random-4"


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_streaming_equals_whole_load(tmp_path, compressed):
    rng = np.random.default_rng(4)
    images = rng.integers(0, 256, (23, 3, 5, 7), dtype=np.uint8)
    path = tmp_path / "s.npz"
    saver = np.savez_compressed if compressed else np.savez
    saver(path, arr_0=images.transpose(0, 2, 3, 1), arr_1=np.arange(23))
    source = NpzSource(path)
    assert len(source) == 23 and source.shape == (3, 5, 7)
    np.testing.assert_array_equal(np.concatenate(list(source.batches(4))), load_samples(path)[0])
    np.savez(tmp_path / "f.npz", arr_0=images.astype(np.float32))
    with pytest.raises(UserInputError, match="f.npz: arr_0 must be uint8"):
        NpzSource(tmp_path / "f.npz")


def test_a_sample_file_header_is_read_once_on_its_way_to_the_batches(tmp_path, monkeypatch):
    import cmboost.files.samples as samples_module

    path = tmp_path / "s.npz"
    np.savez(path, arr_0=np.zeros((9, 4, 4, 1), np.uint8), arr_1=np.arange(9))
    reads = []
    real = samples_module.image_member
    monkeypatch.setattr(samples_module, "image_member", lambda *a: reads.append(1) or real(*a))
    source = samples_module.open_samples(path)
    assert sum(len(b) for b in source.batches(4)) == 9 and len(reads) == 1


# ----------------------------------------------------------------------------- CLI

def _folder_dataset(root, images, labels):
    from PIL import Image

    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0]).save(folder / f"{i:04d}.png")
    return root


def test_cli_reference_then_evaluate_then_refusals(tmp_path, fmnist, capsys):
    images, labels = fmnist
    ref = tmp_path / "ref.npz"
    assert main(["evaluate", "ref", "--data", "fmnist", "--split", "test", "--features", "fmnist", "--out", str(ref),
                 "--num-features", "300", "--device", "cpu", "--quiet"]) == 0
    saved = load_reference(ref)
    assert saved.count == 10000 and saved.features.shape == (300, 256) and saved.data == "fmnist test"
    samples = save_samples(tmp_path / "samples.npz", pad_to(images[200:300], 32))
    out = tmp_path / "metrics.json"
    assert main(["evaluate", str(samples), "--ref", str(ref), "--json", str(out), "--device", "cpu", "--quiet",
                 "--batch-size", "32"]) == 0
    printed = capsys.readouterr().out
    assert "FID" in printed and "sFID" in printed and "n/a" in printed
    result = json.loads(out.read_text())
    assert set(METRIC_KEYS) <= set(result) and result["sfid"] is None and result["num_samples"] == 100
    assert result["fid"] == pytest.approx(evaluate_file(samples, ref, "fmnist", batch_size=50)["fid"], rel=1e-6)

    before = out.read_text()
    assert main(["evaluate", str(samples), "--ref", str(ref), "--json", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exists" in err and out.read_text() == before

    rgb = save_samples(tmp_path / "rgb.npz", np.repeat(pad_to(images[:10], 32), 3, axis=1))
    assert main(["evaluate", str(rgb), "--ref", str(ref), "--json", str(tmp_path / "x.json"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "3x32x32" in err and not (tmp_path / "x.json").exists()


def test_cli_inception_without_weights_fails_with_one_line(tmp_path, fmnist, capsys, monkeypatch):
    monkeypatch.setenv("CMBOOST_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("CMBOOST_OFFLINE", "1")
    samples = save_samples(tmp_path / "s.npz", fmnist[0][:10])
    ref = tmp_path / "r.npz"
    np.savez(ref, mu=np.zeros(2048), sigma=np.eye(2048))
    assert main(["evaluate", str(samples), "--ref", str(ref), "--features", "inception", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights-inception-2015-12-05-6726825d.pth" in err
    assert err.startswith("cmboost evaluate: error:")


def test_cli_train_features_writes_a_documented_net(tmp_path, fmnist, capsys):
    images, labels = fmnist
    data = _folder_dataset(tmp_path / "data", images[:64], labels[:64] % 2)
    out = tmp_path / "net.safetensors"
    args = ["train-features", "--data", f"folder:{data}", "--out", str(out), "--epochs", "1", "--batch-size", "32",
            "--device", "cpu"]
    assert main(args) == 0
    from cmboost.metrics.domain_net import load_domain_net

    net, meta = load_domain_net(out)
    assert net.config.num_classes == 2 and net.config.image_size == 32 and net.config.pad_from == 28
    assert json.loads(meta["settings"])["epochs"] == 1 and not (tmp_path / "net.safetensors.job").exists()
    capsys.readouterr()
    assert main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_torchrun_sharded_evaluation_equals_single_process(tmp_path, fmnist, reference):
    import os
    import subprocess
    import sys
    from pathlib import Path

    ref = save_reference(tmp_path / "ref.npz", reference)
    samples = save_samples(tmp_path / "s.npz", fmnist[0][1000:1150])  # 150 images: uneven 64-batches over 2 ranks
    out = tmp_path / "m.json"
    import socket

    with socket.socket() as sock:  # a free port, so parallel test runs do not collide
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torchrun = Path(sys.executable).with_name("torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(port), "-m", "cmboost",
                           "evaluate", str(samples), "--ref", str(ref), "--json", str(out), "--device", "cpu",
                           "--batch-size", "64", "--quiet"], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sharded = json.loads(out.read_text())
    single = evaluate_file(samples, ref, "fmnist", batch_size=64)
    for key in ("fid", "is", "precision", "recall"):
        assert sharded[key] == pytest.approx(single[key], rel=1e-6, abs=1e-9)  # float64 sums merged per rank
    assert sharded["num_samples"] == 150


def test_kid_follows_the_fixed_keys_and_ranks_like_fid(fmnist, reference):
    from cmboost.metrics.evaluate import KID_KEYS

    real = fmnist[0][600:1000]
    good = evaluate_images(real, reference, "fmnist", batch_size=128)
    assert list(good)[5:7] == list(KID_KEYS)
    blurred = (real.astype(np.float32).reshape(len(real), 1, 14, 2, 14, 2).mean(axis=(3, 5))
               .repeat(2, axis=2).repeat(2, axis=3).round().astype(np.uint8))
    bad = evaluate_images(blurred, reference, "fmnist", batch_size=128)
    assert abs(good["kid"]) < 3 * good["kid_std"] + 1e-3  # same distribution: unbiased, near 0
    assert bad["kid"] > good["kid"] + 3 * bad["kid_std"] and bad["kid_std"] > 0


def test_a_rank_deficient_reference_is_decomposed_once_and_gives_the_same_fid():
    from cmboost.metrics.stats import feature_statistics, frechet_distance
    from cmboost.metrics.prepared import ReferenceStatistics

    rng = np.random.default_rng(0)
    few = rng.normal(size=(20, 40))                     # 20 images, 40-d features: rank 19
    mu, sigma = feature_statistics(few)
    prepared = ReferenceStatistics(mu, sigma)
    kind, root = prepared.fid_route()
    assert kind == "root" and prepared.fid_route()[1] is root  # computed once, then reused
    assert np.allclose((root @ root).numpy(), sigma, atol=1e-9)
    other_mu, other_sigma = feature_statistics(rng.normal(size=(30, 40)) + 0.3)
    assert prepared.fid(other_mu, other_sigma) == pytest.approx(
        frechet_distance(mu, sigma, other_mu, other_sigma), rel=1e-9)
    full_mu, full_sigma = feature_statistics(rng.normal(size=(200, 40)))
    assert ReferenceStatistics(full_mu, full_sigma).fid_route()[0] == "factor"


def test_evaluations_against_one_reference_reuse_its_prepared_statistics(fmnist):
    """The reference's side (Cholesky factor, k-NN radii, KID subsets) is made on the first evaluation
    and reused by the next: a second evaluation of other images finds it made and gives the numbers
    a fresh reference gives."""
    from cmboost.metrics.reference import Reference, reference_stats

    reference = reference_stats(fmnist[0][:600], "fmnist", batch_size=128, num_features=600)
    first = evaluate_images(fmnist[0][600:900], reference, "fmnist", batch_size=128)  # more rows than dimensions
    prepared = [v for k, v in reference.cache.items() if k[0] == "statistics"]
    assert len(prepared) == 1 and prepared[0]._radii and prepared[0]._kid and prepared[0]._fid_route
    made = (prepared[0]._fid_route[1], dict(prepared[0]._radii))
    second = evaluate_images(fmnist[0][900:1200], reference, "fmnist", batch_size=128)
    assert prepared[0]._fid_route[1] is made[0] and all(prepared[0]._radii[k] is v for k, v in made[1].items())
    fresh = Reference(mu=reference.mu, sigma=reference.sigma, features=reference.features,
                      feature_net=reference.feature_net, source=reference.source, count=reference.count)
    assert evaluate_images(fmnist[0][900:1200], fresh, "fmnist", batch_size=128) == second
    assert first != second


def test_a_compact_reference_reads_back_as_float64_statistics_and_float32_features(tmp_path):
    from cmboost.metrics.reference import Reference, load_reference, save_reference
    from cmboost.metrics.stats import feature_statistics, frechet_distance

    rng = np.random.default_rng(1)
    features = rng.normal(size=(300, 32)).astype(np.float32)
    mu, sigma = feature_statistics(features)
    ref = Reference(mu=mu, sigma=sigma, features=features, feature_net="net", count=300, source="x")
    full, compact = tmp_path / "full.npz", tmp_path / "compact.npz"
    save_reference(full, ref)
    save_reference(compact, ref, compact=True)
    assert compact.stat().st_size < 0.7 * full.stat().st_size
    back = load_reference(compact)
    assert back.sigma.dtype == np.float64 and back.features.dtype == np.float32
    assert np.array_equal(back.sigma, sigma.astype(np.float32).astype(np.float64))  # float32-rounded, no worse
    assert np.array_equal(back.mu, mu)
    other_mu, other_sigma = feature_statistics(rng.normal(size=(200, 32)) + 0.2)
    assert frechet_distance(back.mu, back.sigma, other_mu, other_sigma) == \
        pytest.approx(frechet_distance(mu, sigma, other_mu, other_sigma), rel=1e-5)
