import gzip
import hashlib
import http.server
import struct
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cmboost.files import datasets as data, samples
from cmboost.cli import main as cli_main
from cmboost.errors import OutputExistsError, UserInputError


def write_idx(path: Path, array: np.ndarray, magic: int | None = None) -> Path:
    magic = magic if magic is not None else 0x800 | array.ndim
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())
    return path


def fake_fmnist(folder: Path, n_train=60000, n_test=10000) -> Path:
    """Fashion-MNIST-shaped files (zeros), so tests can break one file at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    for split, (images, labels, _) in data.FMNIST_FILES.items():
        n = n_train if split == "train" else n_test
        write_idx(folder / images, np.zeros((n, 28, 28), np.uint8))
        write_idx(folder / labels, np.arange(n) % 10)
    return folder


def random_samples(n=5, c=3, size=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, c, size, size), dtype=np.uint8), rng.integers(0, 10, n)


# ----------------------------------------------------------------------------- Fashion-MNIST

def test_real_fashion_mnist_counts_and_ranges():
    images, labels = data.fashion_mnist("test")
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and set(np.unique(labels)) == set(range(10))
    train_images, train_labels = data.fashion_mnist("train")
    assert len(train_images) == len(train_labels) == 60000


def test_cli_info_reports_counts(capsys):
    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert "60000" in out and "10000" in out


def test_truncated_gz_is_one_clear_error(tmp_path):
    folder = fake_fmnist(tmp_path / "fm", n_train=20, n_test=10)
    target = folder / "t10k-images-idx3-ubyte.gz"
    target.write_bytes(target.read_bytes()[:40])
    with pytest.raises(UserInputError, match="t10k-images.*gzip"):
        data.read_idx(target, data.IDX_MAGIC_IMAGES)


def test_wrong_magic_number(tmp_path):
    path = write_idx(tmp_path / "x.gz", np.zeros((3, 28, 28)), magic=0x0000_0804)
    with pytest.raises(UserInputError, match="x.gz: wrong idx magic number 0x00000804"):
        data.read_idx(path, data.IDX_MAGIC_IMAGES)


def test_size_mismatch_with_header(tmp_path):
    path = tmp_path / "short.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(struct.pack(">IIII", data.IDX_MAGIC_IMAGES, 5, 28, 28) + bytes(28 * 28 * 4))
    with pytest.raises(UserInputError, match="short.gz: idx header says"):
        data.read_idx(path, data.IDX_MAGIC_IMAGES)


def test_wrong_split_size_and_label_count(tmp_path):
    folder = fake_fmnist(tmp_path / "fm", n_train=20, n_test=10)
    with pytest.raises(UserInputError, match="10 images, the test split has 10000"):
        data.fashion_mnist("test", folder)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.zeros(9))
    with pytest.raises(UserInputError, match="9 labels for 10 images"):
        data.fashion_mnist("test", folder)


def test_fashion_mnist_label_out_of_range(tmp_path):
    folder = fake_fmnist(tmp_path / "fm", n_train=20)
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", np.full(10000, 10))
    with pytest.raises(UserInputError, match="label 10 out of range"):
        data.fashion_mnist("test", folder)


def test_cli_info_with_broken_data_dir_reports_not_found(tmp_path, capsys):
    assert cli_main(["info", "--data-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "not found" in out and "holds none of the Fashion-MNIST files" in out  # never another copy
    assert cli_main(["info", "--data-dir", str(tmp_path / "missing")]) == 2
    assert "--data-dir" in capsys.readouterr().err


def test_download_from_a_served_folder(tmp_path):
    served = fake_fmnist(tmp_path / "served", n_train=60000, n_test=10000)
    md5 = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in served.iterdir()}
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(served), **k)  # noqa: E731
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        bad = dict(md5, **{"train-images-idx3-ubyte.gz": "0" * 32})
        with pytest.raises(UserInputError, match="MD5"):
            data.download_fashion_mnist(tmp_path / "bad", base_url=url, md5=bad)
        assert not (tmp_path / "bad" / "train-images-idx3-ubyte.gz").exists()
        folder = data.download_fashion_mnist(tmp_path / "dl", base_url=url, md5=md5)
        images, labels = data.fashion_mnist("test", folder)
        assert images.shape == (10000, 28, 28) and labels[:3].tolist() == [0, 1, 2]
        with pytest.raises(UserInputError, match="download failed"):
            data.download_fashion_mnist(tmp_path / "missing", base_url=url + "nothing/", md5=md5)
    finally:
        server.shutdown()


# ----------------------------------------------------------------------------- ImageNet 64 and folders

def test_imagenet64_npz_is_channel_planar_and_zero_based(tmp_path):
    rng = np.random.default_rng(0)
    nchw = rng.integers(0, 256, (4, 3, 64, 64), dtype=np.uint8)
    np.savez(tmp_path / "train_data_batch_1.npz", data=nchw.reshape(4, -1), labels=[1, 2, 1000, 5])
    np.savez(tmp_path / "train_data_batch_2.npz", data=nchw[:1].reshape(1, -1), labels=[7])
    images, labels = data.imagenet64(tmp_path)
    assert images.shape == (5, 3, 64, 64)
    np.testing.assert_array_equal(images[:4], nchw)
    assert labels.tolist() == [0, 1, 999, 4, 6]
    np.savez(tmp_path / "val_data.npz", data=nchw.reshape(4, -1), labels=[0, 1, 2, 3])
    with pytest.raises(UserInputError, match="val_data.npz: labels must be one-based"):
        data.imagenet64(tmp_path, "val")


def test_image_folder(tmp_path):
    from PIL import Image

    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / name).mkdir()
        for i in range(2):
            Image.fromarray(np.full((6, 6, 3), value + i, np.uint8)).save(tmp_path / name / f"{i}.png")
    images, labels, classes = data.image_folder(tmp_path)
    assert classes == ["cat", "dog"] and labels.tolist() == [0, 0, 1, 1]
    assert images.shape == (4, 3, 6, 6) and images[3, 0, 0, 0] == 201
    images, _, _ = data.image_folder(tmp_path, image_size=4)
    assert images.shape == (4, 3, 4, 4)


def test_load_dataset_pads_fmnist():
    images, labels, k = data.load_dataset("fmnist", "test", image_size=32)
    assert images.shape == (10000, 1, 32, 32) and k == 10
    assert images[:, :, :2].max() == 0


# ----------------------------------------------------------------------------- sample files

@pytest.mark.parametrize("channels", [1, 3])
def test_npz_round_trip_is_exact(tmp_path, channels):
    images, labels = random_samples(c=channels)
    path = samples.save_samples(tmp_path / "s.npz", images, labels)
    with np.load(path) as raw:  # on disk: OpenAI's NHWC layout
        assert raw["arr_0"].shape == (5, 8, 8, channels)
    back_images, back_labels = samples.load_samples(path)
    np.testing.assert_array_equal(back_images, images)
    np.testing.assert_array_equal(back_labels, labels)


def test_png_folder_round_trip_is_exact(tmp_path):
    for channels in (1, 3):
        images, labels = random_samples(c=channels, seed=channels)
        path = samples.save_samples(tmp_path / f"pngs{channels}", images, labels)
        back_images, back_labels = samples.load_samples(path)
        np.testing.assert_array_equal(back_images, images)
        np.testing.assert_array_equal(back_labels, labels)


def test_existing_output_is_refused_unless_asked(tmp_path):
    images, labels = random_samples()
    path = samples.save_samples(tmp_path / "s.npz", images, labels)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="already exists"):
        samples.save_samples(path, images[:2], labels[:2])
    assert path.read_bytes() == before
    samples.save_samples(path, images[:2], labels[:2], overwrite=True)
    assert len(samples.load_samples(path)[0]) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["s.npz"]  # no temp files left behind


def test_npz_without_arr_0(tmp_path):
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UserInputError, match=r"x.npz: no 'arr_0' array \(has images\)"):
        samples.load_samples(tmp_path / "x.npz")


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 8, 8, 3), np.float32), "arr_0 must be uint8, got float32"),
    (np.zeros((2, 8, 8), np.uint8), "4 dimensions"),
    (np.zeros((2, 8, 8, 2), np.uint8), "1 or 3 channels"),
])
def test_bad_sample_arrays(tmp_path, array, message):
    np.savez(tmp_path / "x.npz", arr_0=array)
    with pytest.raises(UserInputError, match=message):
        samples.load_samples(tmp_path / "x.npz")


def test_bad_labels(tmp_path):
    images = np.zeros((3, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "count.npz", arr_0=images, arr_1=np.array([0, 1]))
    with pytest.raises(UserInputError, match="count.npz: 2 labels for 3 images"):
        samples.load_samples(tmp_path / "count.npz")
    np.savez(tmp_path / "range.npz", arr_0=images, arr_1=np.array([0, 1, 12]))
    with pytest.raises(UserInputError, match="range.npz: label 12 out of range for 10 classes"):
        samples.load_samples(tmp_path / "range.npz", num_classes=10)
    np.savez(tmp_path / "neg.npz", arr_0=images, arr_1=np.array([0, -1, 2]))
    with pytest.raises(UserInputError, match="negative label"):
        samples.load_samples(tmp_path / "neg.npz")


def test_not_an_npz(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(UserInputError, match="junk.npz: not a readable .npz"):
        samples.load_samples(tmp_path / "junk.npz")


def test_conversions_round_and_reject_nan():
    x = torch.tensor([[[[0.0, 0.5 / 255, 0.49 / 255, 1.0, 1.7 / 255]]]])
    assert samples.to_uint8(x).ravel().tolist() == [0, 0, 0, 255, 2]  # 0.5 rounds half to even, 1.7 -> 2
    signed = samples.to_float(np.array([[[[0, 255, 128]]]], np.uint8), "signed")
    assert torch.allclose(signed.ravel(), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]), atol=1e-6)
    levels = np.arange(256, dtype=np.uint8).reshape(1, 1, 16, 16)
    np.testing.assert_array_equal(samples.to_uint8(samples.to_float(levels)), levels)
    np.testing.assert_array_equal(samples.to_uint8(samples.to_float(levels, "signed"), "signed"), levels)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(UserInputError, match="NaN or inf"):
            samples.to_uint8(torch.full((1, 1, 2, 2), bad))


# ----------------------------------------------------------------------------- the CLI's bad-input contract

def test_cli_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 8, 8, 3), np.float64))
    out = tmp_path / "out.npz"
    assert cli_main(["convert", str(tmp_path / "bad.npz"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.npz" in err and "uint8" in err and "Traceback" not in err
    assert not out.exists()


def test_cli_convert_round_trip_and_refuses_overwrite(tmp_path, capsys):
    images, labels = random_samples()
    src = samples.save_samples(tmp_path / "s.npz", images, labels)
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "pngs")]) == 0
    assert cli_main(["convert", str(tmp_path / "pngs"), "--out", str(tmp_path / "back.npz")]) == 0
    np.testing.assert_array_equal(samples.load_samples(tmp_path / "back.npz")[0], images)
    assert cli_main(["convert", str(src), "--out", str(tmp_path / "back.npz")]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_cli_subprocess_has_no_traceback(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "cmboost", "convert", str(tmp_path / "missing.npz"),
                           "--out", str(tmp_path / "o.npz")], capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"cmboost convert: error: {tmp_path / 'missing.npz'}: file not found"]


def test_equal_samples_give_byte_identical_files(tmp_path):
    images, labels = random_samples()
    a = samples.save_samples(tmp_path / "a.npz", images, labels)
    import time

    time.sleep(2.1)  # zip entries carry a timestamp with 2 s resolution; ours is fixed
    b = samples.save_samples(tmp_path / "b.npz", images, labels)
    assert a.read_bytes() == b.read_bytes()


def test_cli_export_data_slice(tmp_path, capsys):
    out = tmp_path / "heldout.npz"
    assert cli_main(["export-data", "--split", "test", "--start", "9990", "--image-size", "32", "--out", str(out)]) == 0
    images, labels = samples.load_samples(out)
    test_images, test_labels = data.fashion_mnist("test")
    assert images.shape == (10, 1, 32, 32)
    np.testing.assert_array_equal(images[:, 0, 2:30, 2:30], test_images[9990:])
    np.testing.assert_array_equal(labels, test_labels[9990:])
    assert cli_main(["export-data", "--split", "test", "--start", "5", "--stop", "20000", "--out",
                     str(tmp_path / "x.npz")]) == 2
    assert "outside the 10000 images" in capsys.readouterr().err


def test_map_samples_matches_load_samples_and_checks(tmp_path):
    images, labels = random_samples(n=7, c=3)
    ours = samples.save_samples(tmp_path / "ours.npz", images, labels)
    np.savez(tmp_path / "numpy.npz", arr_0=images.transpose(0, 2, 3, 1), arr_1=labels)
    np.savez_compressed(tmp_path / "compressed.npz", arr_0=images.transpose(0, 2, 3, 1), arr_1=labels)
    for path in (ours, tmp_path / "numpy.npz", tmp_path / "compressed.npz"):
        mapped, mapped_labels = samples.map_samples(path)
        np.testing.assert_array_equal(np.ascontiguousarray(mapped[2:5]), images[2:5])
        np.testing.assert_array_equal(mapped_labels, labels)
    assert isinstance(samples.map_samples(ours)[0], np.memmap)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(ours.read_bytes()[:-200])
    with pytest.raises(UserInputError, match="truncated.npz"):
        samples.map_samples(truncated)
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(UserInputError, match="float.npz: arr_0 must be uint8"):
        samples.map_samples(tmp_path / "float.npz")
