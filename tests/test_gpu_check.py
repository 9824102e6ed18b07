"""benchmarks/gpu_check.sh --smoke: every part of the prepared GPU run at toy sizes on the CPU, so that the
script does not rot between the rare runs on a GPU (about a minute on a 2-core CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("env", "tests", "boost", "train_jcd", "sample", "features", "fmnist")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("torch_fidelity")  # the Inception benchmark compares against it
    out = tmp_path_factory.mktemp("gpu-check") / "out"
    work = out.parent / "work"
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--smoke", "--out", str(out),
                           "--work-dir", str(work)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return done, out


def test_smoke_run_reports_every_part(smoke):
    done, out = smoke
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["mode"] == "smoke" and result["device"] == "cpu"
    assert set(result["parts"]) == set(PARTS)
    for part, entry in result["parts"].items():
        # no GPU here: the CUDA tests all skip; everything else runs at toy sizes
        assert entry["status"] == ("skipped" if part == "tests" else "passed"), (part, entry)
        assert entry["seconds"] > 0
    tests = result["parts"]["tests"]["tests"]
    assert tests and all(t["outcome"] == "skipped" for t in tests.values())
    for part, key in (("boost", "resnet_small"), ("train_jcd", "resnet_small"), ("sample", "fp32-reference")):
        assert result["parts"][part]["figures"]["results"][key], part
    assert result["parts"]["features"]["figures"]["results"]["fid"]["images_per_set"] == 2
    stages = result["parts"]["fmnist"]["figures"]["stages"]
    assert all(stages[s]["exported"] for s in ("edm", "ct", "cd", "jcd"))
    assert [t["met"] for t in result["targets"]] == [None] * 5  # a smoke run measures nothing


def test_smoke_output_fits_what_the_device_tool_returns(smoke):
    _, out = smoke
    result = json.loads((out / "gpu_check.json").read_text())
    files = [p for p in out.rglob("*") if p.is_file()]
    assert result["out_files"]["problems"] == []
    assert len(files) <= 8 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    assert sorted(p.name for p in (out / "fmnist").iterdir()) == [
        "cd.safetensors", "ct.safetensors", "edm.safetensors", "jcd-joint.safetensors", "training.json"]
    assert "===== fmnist" in (out / "gpu_check.log").read_text()


def test_table_rows_for_the_readme(smoke):
    _, out = smoke
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--table",
                           str(out / "gpu_check.json")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = done.stdout.splitlines()
    assert rows and all(r.startswith("| cpu | ") and r.count("|") == 8 for r in rows)
    assert any("boost resnet_small" in r for r in rows) and any("Inception FID" in r for r in rows)
