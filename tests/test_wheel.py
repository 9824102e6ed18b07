"""The shipped assets arrive through package data: build the wheel from a copy of the checkout,
install it (--no-deps) into a fresh virtual environment outside the repository, and run the CLI
from there on the shipped checkpoints, judge and reference.

The fresh environment borrows the dependencies (torch, numpy, ...) of the interpreter running the
tests through a .pth file holding one plain path line: the borrowed site-packages is appended to
sys.path but its own .pth files are not processed, so the editable install's finder (which would
import cmboost from the checkout) stays inactive. Nothing here is skipped: an environment that cannot
build or install the wheel fails with the command's output.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
NUM = 16  # images in the end-to-end check


def _run(cmd, *, cwd, env=None, timeout=300):
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, check=False, capture_output=True,
                          text=True, timeout=timeout)


def _ok(proc, what):
    assert proc.returncode == 0, (f"{what} exited {proc.returncode}\ncommand: {' '.join(proc.args)}\n"
                                  f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
    return proc


def _build_artefacts() -> dict[str, int]:
    """What a build run in the checkout would leave there: build/, dist/, *.egg-info (mtimes, one level deep)."""
    seen = {}
    for top in [REPO / "build", REPO / "dist", *REPO.glob("*.egg-info"), *(REPO / "cmboost").glob("*.egg-info")]:
        if top.exists():
            seen[str(top)] = top.stat().st_mtime_ns
            if top.is_dir():
                seen.update({str(p): p.stat().st_mtime_ns for p in top.iterdir()})
    return seen


def _copy_checkout(dest: Path) -> list[str]:
    """Copy the checkout's tracked and untracked-but-not-ignored files (never .venv, build/, *.egg-info)."""
    proc = _ok(_run(["git", "-C", REPO, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                    timeout=60), "git ls-files (the wheel is built from the checkout's files)")
    files = []
    for rel in sorted(set(filter(None, proc.stdout.split("\0")))):
        src = REPO / rel
        if not src.is_file() and not src.is_symlink():  # tracked but deleted in the working tree
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target, follow_symlinks=False)
        files.append(rel)
    assert "pyproject.toml" in files, f"git ls-files in {REPO} listed no pyproject.toml"
    return files


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """Build the wheel outside the checkout and install it into a fresh venv; returns the paths and env."""
    before = _build_artefacts()
    tmp = tmp_path_factory.mktemp("wheel")
    src, dist, venv, work = tmp / "src", tmp / "dist", tmp / "venv", tmp / "work"
    work.mkdir()
    files = _copy_checkout(src)

    pip_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PIP_REQUIRE_VIRTUALENV")}
    pip_env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # setuptools comes from the test interpreter's environment (torch requires setuptools>=77, which
    # builds wheels without the 'wheel' package); --no-index: the build needs no registry at all.
    proc = _run([sys.executable, "-m", "pip", "wheel", src, "--no-deps", "--no-build-isolation", "--no-index",
                 "-w", dist], cwd=tmp, env=pip_env)
    _ok(proc, "pip wheel --no-build-isolation (needs setuptools>=70.1 in the test interpreter's environment)")
    wheels = sorted(dist.glob("cmboost-*.whl"))
    assert len(wheels) == 1, f"expected one cmboost wheel in {dist}, found {wheels}\n{proc.stdout}\n{proc.stderr}"

    base_python = getattr(sys, "_base_executable", None) or sys.executable
    _ok(_run([base_python, "-m", "venv", "--without-pip", venv], cwd=tmp, env=pip_env, timeout=120),
        f"python -m venv with {base_python}")
    python = venv / "bin" / "python"
    # The test interpreter's pip installs into the fresh venv (--python): no pip bootstrap, same result.
    _ok(_run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", wheels[0]],
             cwd=tmp, env=pip_env), "pip install --no-deps of the wheel into the fresh venv")
    site = Path(_ok(_run([python, "-I", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                         cwd=work, env=pip_env, timeout=60), "fresh venv's site-packages").stdout.strip())
    assert site.is_dir() and site.resolve().is_relative_to(venv.resolve()), f"fresh venv site-packages {site}"

    torch_spec = importlib.util.find_spec("torch")
    assert torch_spec is not None and torch_spec.origin, "torch is not importable by the test interpreter"
    deps_site = Path(torch_spec.origin).resolve().parent.parent
    (site / "_cmboost_test_deps.pth").write_text(f"{deps_site}\n")

    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "CMBOOST_WEIGHTS")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    return {"tmp": tmp, "src": src, "files": files, "wheel": wheels[0], "venv": venv, "python": python,
            "site": site, "work": work, "env": env, "before": before}


def test_wheel_holds_every_package_file(installed):
    """Every file of the package in the checkout (code and assets) is in the wheel, and so is every
    file that demo.json names."""
    with zipfile.ZipFile(installed["wheel"]) as whl:
        in_wheel = {n for n in whl.namelist() if n.startswith("cmboost/") and not n.endswith("/")}
    package = {f for f in installed["files"] if f.startswith("cmboost/") and "__pycache__" not in f}
    missing = sorted(package - in_wheel)
    assert not missing, (f"files of the package missing from {installed['wheel'].name} (see pyproject.toml "
                         f"[tool.setuptools.package-data]): {missing}")
    demo = json.loads((installed["src"] / "cmboost/assets/fmnist/demo.json").read_text())
    named = [*demo["checkpoints"].values(), *demo["tuned"].values()]
    absent = sorted(n for n in named if f"cmboost/assets/fmnist/{n}" not in in_wheel)
    assert not absent, f"demo.json names files the wheel lacks: {absent}"


def test_cmboost_imports_from_the_wheel(installed):
    proc = _ok(_run([installed["python"], "-c", "import cmboost, cmboost.cli; print(cmboost.__file__)"],
                    cwd=installed["work"], env=installed["env"], timeout=120), "import cmboost in the fresh venv")
    where = Path(proc.stdout.strip().splitlines()[-1]).resolve()
    assert where == (installed["site"] / "cmboost" / "__init__.py").resolve(), (
        f"cmboost imported from {where}, not from the fresh venv's site-packages {installed['site']}")
    assert not where.is_relative_to(REPO), f"cmboost imported from the checkout: {where}"


def test_info_points_at_the_installed_assets(installed):
    proc = _ok(_run([installed["venv"] / "bin" / "cmboost", "info"], cwd=installed["work"], env=installed["env"],
                    timeout=180), "cmboost info from the fresh venv")
    lines = {line.split(None, 1)[0]: line.split(None, 1)[1] if len(line.split(None, 1)) > 1 else ""
             for line in proc.stdout.splitlines() if line.strip()}
    assert "weights_dirs" in lines, f"cmboost info printed no weights_dirs line:\n{proc.stdout}\n{proc.stderr}"
    assets = installed["site"] / "cmboost" / "assets"
    assert str(assets) in lines["weights_dirs"], (
        f"cmboost info's weights folders {lines['weights_dirs']} lack the installed assets {assets}")
    assert str(REPO / "cmboost") not in proc.stdout, f"cmboost info names the checkout:\n{proc.stdout}"
    assert (assets / "fmnist" / "demo.json").is_file(), f"{assets}/fmnist/demo.json is not installed"
    assert (assets / "fmnist_features_allconv.safetensors").is_file()


def test_sample_boost_evaluate_with_the_installed_assets(installed):
    """The demo's CT generator samples 16 images, its booster refines them with its tuned settings,
    and a shipped judge scores them against the shipped test-split reference: all read from the
    installed package."""
    fmnist = installed["site"] / "cmboost" / "assets" / "fmnist"
    demo = json.loads((fmnist / "demo.json").read_text())
    generator = fmnist / demo["checkpoints"]["ct"]
    booster = fmnist / demo["checkpoints"][demo["booster"]]
    settings = fmnist / demo["tuned"]["ct1"]
    reference = fmnist / "ref-test-fmnist-allconv.npz"
    for path in (generator, booster, settings, reference):
        assert path.is_file(), f"{path} is not installed"
    cli, work, env = installed["venv"] / "bin" / "cmboost", installed["work"], installed["env"]
    samples, boosted, scores = work / "ct1.npz", work / "ct1-boosted.npz", work / "ct1-boosted.json"

    _ok(_run([cli, "sample", "--model", generator, "--num", NUM, "--seed", demo["eval_seeds"]["ct1"][0],
              "--out", samples, "--no-progress"], cwd=work, env=env), "cmboost sample")
    _ok(_run([cli, "boost", samples, "--model", booster, "--settings", settings, "--out", boosted, "--no-grid"],
             cwd=work, env=env), "cmboost boost")
    proc = _ok(_run([cli, "evaluate", boosted, "--features", "fmnist-allconv", "--ref", reference,
                     "--json", scores, "--quiet"], cwd=work, env=env), "cmboost evaluate")

    with np.load(samples) as before, np.load(boosted) as after:
        assert before["arr_0"].shape == after["arr_0"].shape == (NUM, 32, 32, 1), before["arr_0"].shape
        assert np.array_equal(before["arr_1"], after["arr_1"]), "boosting changed the labels"
        assert not np.array_equal(before["arr_0"], after["arr_0"]), "the booster left every image unchanged"
    result = json.loads(scores.read_text())
    assert result["num_samples"] == NUM and result["features"] == "fmnist-allconv", result
    assert Path(result["reference"]).resolve() == reference.resolve(), result["reference"]
    assert math.isfinite(result["fid"]) and result["fid"] >= 0, (result, proc.stdout)


def test_nothing_written_into_the_repository(installed):
    assert _build_artefacts() == installed["before"], "building the wheel left build artefacts in the checkout"
