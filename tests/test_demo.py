import json
import math
from pathlib import Path

import pytest

from cmboost.cli import main as cli_main
from cmboost.demo import ASSETS, SETTINGS_FILE

COMMITTED_QUICK = Path(__file__).resolve().parent.parent / "recipes" / "fmnist-report" / "quick.json"
# The quick demo is deterministic on one machine; other CPUs and torch builds differ in the last
# bits of the convolutions, which can flip a handful of rounded pixels. Stated tolerance:
RELATIVE_TOLERANCE = 0.05  # FID and IS
PR_TOLERANCE = 0.05  # precision and recall, absolute: about two of the 48 quick samples


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    assert cli_main(["demo", "--quick", "--out-dir", str(out), "--device", "cpu", "--quiet"]) == 0
    return out


def test_shipped_checkpoints_are_small_and_described():
    settings = json.loads(SETTINGS_FILE.read_text())
    files = [ASSETS / name for name in settings["checkpoints"].values()]
    files.append(ASSETS.parent / "fmnist_features.safetensors")
    assert sum(f.stat().st_size for f in files) <= 30 * 2 ** 20
    readme = (ASSETS / "README.md").read_text()
    for name in settings["checkpoints"].values():
        assert name in readme


def test_quick_demo_writes_every_file(quick_report):
    for name in ("report.md", "report.json", "rows.json", "fid-vs-steps.png", "grid-ct1.png", "grid-ct2.png",
                 "grid-cd1.png", "grid-cd2.png"):
        assert (quick_report / name).is_file(), name
    report = json.loads((quick_report / "report.json").read_text())
    assert len(report["table1"]) == 4 * 4 and len(report["table2"]) == 4
    for row in report["table1"]:
        assert all(math.isfinite(row[key]) for key in ("fid", "is", "precision", "recall"))
    for row in report["table2"]:
        assert all(math.isfinite(v) for k, v in row.items() if k != "objective")
    assert "Table 1" in (quick_report / "report.md").read_text()


def test_quick_demo_reproduces_the_committed_numbers(quick_report):
    ours = json.loads((quick_report / "report.json").read_text())
    committed = json.loads(COMMITTED_QUICK.read_text())
    assert len(ours["table1"]) == len(committed["table1"])
    for mine, theirs in zip(ours["table1"], committed["table1"]):
        assert (mine["generator"], mine["steps"], mine["boost"]) == (theirs["generator"], theirs["steps"], theirs["boost"])
        for key in ("fid", "is"):
            assert mine[key] == pytest.approx(theirs[key], rel=RELATIVE_TOLERANCE)
        for key in ("precision", "recall"):
            assert mine[key] == pytest.approx(theirs[key], abs=PR_TOLERANCE)


def test_rerun_prints_the_finished_report_without_redoing_it(quick_report, capsys):
    before = (quick_report / "report.json").stat().st_mtime_ns
    assert cli_main(["demo", "--quick", "--out-dir", str(quick_report), "--device", "cpu"]) == 0
    assert "already done" in capsys.readouterr().out
    assert (quick_report / "report.json").stat().st_mtime_ns == before
    assert cli_main(["demo", "--out-dir", str(quick_report), "--device", "cpu"]) == 2  # full over quick
