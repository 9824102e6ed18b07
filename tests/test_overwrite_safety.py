"""--overwrite never deletes a user's files (issue 19, item 2).

An output path that is empty, the current folder or one above it is refused; an existing output is
replaced only by its own kind (a file by an .npz, a folder by a PNG folder) and a folder only when
cmboost wrote it (its .cmboost-samples marker, nothing else inside); a sample output's suffix is
.npz or none, so the format never differs from the name. Each refusal is exit 2, one stderr line,
before any work, with the user's files untouched.
"""

import json
from pathlib import Path

import numpy as np
import pytest

import cmboost
from cmboost.cli import main as cli_main
from cmboost.files.samples import load_samples, save_samples
from cmboost.files.png import SAMPLES_MARKER

ASSETS = Path(cmboost.__file__).parent / "assets" / "fmnist"
JCD = ASSETS / "jcd-joint-w24.safetensors"
CM = ASSETS / "cd.safetensors"
THESIS = "four years of work\n"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("inputs") / "good.npz"
    rng = np.random.default_rng(0)
    return save_samples(path, rng.integers(0, 256, (8, 1, 32, 32), dtype=np.uint8), np.arange(8) % 10)


def _run(capsys, argv):
    try:
        code = cli_main([str(a) for a in argv])
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return code, captured.err.strip()


def _refused(code, err, *must_name):
    assert code == 2, err
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for text in must_name:
        assert text in err, err


def _tree(folder: Path) -> dict:
    """Every file under `folder` with its bytes, to show nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# Every verb that writes samples, with the output path `out` (the boost/sample ones fail on the path
# before any network is loaded).
WRITERS = [
    ("boost", lambda good, out: ["boost", good, "--model", JCD, "--steps", "1", "--no-grid", "--out", out]),
    ("sample", lambda good, out: ["sample", "--model", CM, "--num", "4", "--out", out]),
    ("convert", lambda good, out: ["convert", good, "--out", out]),
    ("export-data", lambda good, out: ["export-data", "--data", "fmnist", "--stop", "4", "--out", out]),
]
WRITER_IDS = [w[0] for w in WRITERS]


# ----------------------------------------------------------------------------- the current folder and above

@pytest.mark.parametrize("writer", WRITERS, ids=WRITER_IDS)
def test_empty_out_with_overwrite_keeps_the_current_folder(writer, good, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.txt").write_text(THESIS)
    before = _tree(tmp_path)
    code, err = _run(capsys, writer[1](good, "") + ["--overwrite"])
    _refused(code, err, "--out", "empty")
    assert _tree(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["thesis.txt"]


def test_empty_out_without_overwrite_names_the_flag_and_does_not_advise_overwrite(good, tmp_path, monkeypatch,
                                                                                 capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thesis.txt").write_text(THESIS)
    code, err = _run(capsys, ["convert", good, "--out", ""])
    _refused(code, err, "--out", "current folder")
    assert "pass --overwrite" not in err
    assert (tmp_path / "thesis.txt").read_text() == THESIS


@pytest.mark.parametrize("name", [".", "..", "cwd", "/", "sub/.."])
def test_the_current_folder_or_one_above_is_never_an_output(name, good, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    monkeypatch.chdir(work)
    (work / "thesis.txt").write_text(THESIS)
    (tmp_path / "notes.txt").write_text(THESIS)
    before = _tree(tmp_path)
    out = str(work) if name == "cwd" else name
    code, err = _run(capsys, ["convert", good, "--out", out, "--overwrite"])
    _refused(code, err, "--out")
    assert _tree(tmp_path) == before


# ----------------------------------------------------------------------------- folders cmboost did not write

def test_overwrite_keeps_a_folder_cmboost_did_not_write(good, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "thesis.txt").write_text(THESIS)
    code, err = _run(capsys, ["convert", good, "--out", results, "--overwrite"])
    _refused(code, err, str(results), "not written by cmboost", "kept")
    assert _tree(results) == {"thesis.txt": THESIS.encode()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]  # no temp folder left behind


def test_overwrite_keeps_a_png_folder_from_before_the_marker(good, tmp_path, capsys):
    old = save_samples(tmp_path / "old", load_samples(good)[0])
    (old / SAMPLES_MARKER).unlink()  # as a cmboost older than the marker wrote it
    before = _tree(old)
    code, err = _run(capsys, ["convert", good, "--out", old, "--overwrite"])
    _refused(code, err, str(old), "not written by cmboost", "delete it yourself")
    assert _tree(old) == before


def test_overwrite_keeps_a_cmboost_folder_holding_a_users_file(good, tmp_path, capsys):
    pngs = save_samples(tmp_path / "pngs", load_samples(good)[0])
    (pngs / "thesis.txt").write_text(THESIS)
    before = _tree(pngs)
    code, err = _run(capsys, ["convert", good, "--out", pngs, "--overwrite"])
    _refused(code, err, str(pngs), "thesis.txt", "kept")
    assert _tree(pngs) == before


def test_an_unmarked_folder_is_refused_without_overwrite_advice(good, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    (results / "thesis.txt").write_text(THESIS)
    code, err = _run(capsys, ["convert", good, "--out", results])
    _refused(code, err, str(results), "not written by cmboost")
    assert "pass --overwrite" not in err and _tree(results) == {"thesis.txt": THESIS.encode()}


# ----------------------------------------------------------------------------- a file only by a file

@pytest.mark.parametrize("writer", WRITERS, ids=WRITER_IDS)
def test_a_model_file_is_not_replaced_by_a_png_folder(writer, good, tmp_path, capsys):
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"weights")
    code, err = _run(capsys, writer[1](good, model) + ["--overwrite"])
    _refused(code, err, "--out", "m.safetensors", "'.safetensors'")
    assert model.read_bytes() == b"weights" and sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


@pytest.mark.parametrize("name", ["x.png", "out.pt", "a.json", "m.safetensors", "s.NPZ"])
@pytest.mark.parametrize("writer", WRITERS, ids=WRITER_IDS)
def test_a_sample_output_is_npz_or_a_folder_without_suffix(writer, name, good, tmp_path, capsys):
    out = tmp_path / name
    code, err = _run(capsys, writer[1](good, out))
    _refused(code, err, "--out", name, ".npz")
    assert list(tmp_path.iterdir()) == []


def test_a_file_at_a_png_folder_output_is_kept_even_with_overwrite(good, tmp_path, capsys):
    results = tmp_path / "results"
    results.write_text(THESIS)
    code, err = _run(capsys, ["convert", good, "--out", results, "--overwrite"])
    _refused(code, err, str(results), "is a file", "kept")
    assert results.read_text() == THESIS and sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_a_folder_at_an_npz_output_is_kept_even_with_overwrite(good, tmp_path, capsys):
    folder = tmp_path / "s.npz"
    folder.mkdir()
    (folder / "thesis.txt").write_text(THESIS)
    code, err = _run(capsys, ["convert", good, "--out", folder, "--overwrite"])
    _refused(code, err, str(folder), "is a folder", "kept")
    assert _tree(folder) == {"thesis.txt": THESIS.encode()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.npz"]


def test_a_symlink_at_a_png_folder_output_is_kept(good, tmp_path, capsys):
    target = save_samples(tmp_path / "pngs", load_samples(good)[0])
    link = tmp_path / "link"
    link.symlink_to(target)
    before = _tree(target)
    code, err = _run(capsys, ["convert", good, "--out", link, "--overwrite"])
    _refused(code, err, str(link), "symbolic link")
    assert link.is_symlink() and _tree(target) == before


# ----------------------------------------------------------------------------- what --overwrite still does

def test_overwrite_replaces_a_png_folder_cmboost_wrote(good, tmp_path, capsys):
    images, labels = load_samples(good)
    small = save_samples(tmp_path / "small.npz", images[:3], labels[:3])
    pngs = tmp_path / "pngs"
    assert _run(capsys, ["convert", good, "--out", pngs])[0] == 0
    marker = json.loads((pngs / SAMPLES_MARKER).read_text())
    assert marker["format"] == "cmboost-png-samples" and marker["version"] == 1
    code, err = _run(capsys, ["convert", good, "--out", pngs])
    _refused(code, err, str(pngs), "already exists; pass --overwrite")
    code, err = _run(capsys, ["convert", small, "--out", pngs, "--overwrite"])
    assert code == 0, err
    back, back_labels = load_samples(pngs)
    np.testing.assert_array_equal(back, images[:3])
    np.testing.assert_array_equal(back_labels, labels[:3])
    assert sorted(p.name for p in pngs.iterdir()) == [SAMPLES_MARKER, "000000.png", "000001.png", "000002.png",
                                                      "labels.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pngs", "small.npz"]  # nothing set aside is left


def test_overwrite_replaces_an_npz(good, tmp_path, capsys):
    images, labels = load_samples(good)
    out = save_samples(tmp_path / "out.npz", images[:2], labels[:2])
    code, err = _run(capsys, ["convert", good, "--out", out, "--overwrite"])
    assert code == 0, err
    np.testing.assert_array_equal(load_samples(out)[0], images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npz"]


def test_boost_overwrites_a_png_folder_it_wrote(good, tmp_path, capsys):
    out = tmp_path / "boosted"
    argv = ["boost", good, "--model", JCD, "--steps", "1", "--batch-size", "4", "--out", out]
    assert _run(capsys, argv)[0] == 0
    assert (out / SAMPLES_MARKER).is_file() and (tmp_path / "boosted.grid.png").is_file()
    code, err = _run(capsys, argv + ["--overwrite"])
    assert code == 0, err
    assert len(load_samples(out)[0]) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["boosted", "boosted.grid.png"]
