import json
import shutil
import math
from pathlib import Path

import numpy as np
import pytest

from cmboost.cli import main as cli_main
from cmboost.demo.plan import choose_panel
from cmboost.demo.assets import ASSETS, SETTINGS_FILE, load_judge_check
from cmboost.metrics.judges import ATTACKER, REPORTING_JUDGES
from cmboost.boosting.settings import tuning_judges

COMMITTED_QUICK = Path(__file__).resolve().parent.parent / "recipes" / "fmnist-report" / "quick.json"
# Another CPU rounds the convolutions differently (oneDNN/MKL code paths), and PGD and SGLD turn a
# last-bit difference into different pixels; no fixed tolerance is right for that. Two checks replace
# a golden number:
# - on one machine the demo is deterministic: two runs give the same numbers and the same grid bytes;
# - across machines, the committed numbers are reproduced within their statistical error. At worst,
#   other rounding is another draw of the boosted pixels. An unboosted row is compared directly, within
#   4 s, s its spread over sample seeds (pooled over the boosts). A boosted row is compared by its change
#   from the unboosted row of the same seed (paired: the sample set's own luck cancels, which is what
#   lets the bound see effects of a few percent on 48 images), within 4 s_d, s_d the seed-to-seed spread
#   of that change pooled over the boosts. Two independent draws differ by more than 4 s with
#   probability below 0.5% (|z| > 2.83). KID also carries its own subset std; the bound is the larger.
SEED_SPREAD_BOUND = 4.0
COMPARED = ("fid", "kid", "precision", "recall")


def _strip_timings(value):
    """The report without its wall-clock fields, which are the only ones allowed to differ."""
    if isinstance(value, dict):
        return {k: _strip_timings(v) for k, v in value.items() if k != "seconds"}
    if isinstance(value, list):
        return [_strip_timings(v) for v in value]
    return value


def pooled_seed_std(headline: list[dict]) -> dict:
    """s for each (generator, judge, metric): the within-boost spread over sample seeds, pooled."""
    groups: dict = {}
    for row in headline:
        for judge, numbers in row["judges"].items():
            for key in COMPARED:
                groups.setdefault((row["gen"], judge, key, row["boost"]), []).append(numbers[key])
    sums: dict = {}
    for (gen, judge, key, _), values in groups.items():
        mean = sum(values) / len(values)
        ss, dof = sums.get((gen, judge, key), (0.0, 0))
        sums[(gen, judge, key)] = (ss + sum((v - mean) ** 2 for v in values), dof + len(values) - 1)
    return {k: math.sqrt(ss / dof) for k, (ss, dof) in sums.items() if dof > 0}


def paired_seed_std(headline: list[dict]) -> dict:
    """s_d for each (generator, judge, metric): the spread over sample seeds of a boost's change from the
    unboosted row of the same seed, pooled over the boosts."""
    base = {(r["gen"], r["seed"]): r for r in headline if r["boost"] == "none"}
    changes = [dict(r, judges={j: {k: m[k] - base[r["gen"], r["seed"]]["judges"][j][k] for k in COMPARED}
                               for j, m in r["judges"].items()})
               for r in headline if r["boost"] != "none"]
    return pooled_seed_std(changes)


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo-out"
    assert cli_main(["demo", "--quick", "--out-dir", str(out), "--device", "cpu", "--quiet"]) == 0
    return out


def test_shipped_checkpoints_are_small_and_described():
    settings = json.loads(SETTINGS_FILE.read_text())
    files = [ASSETS / name for name in settings["checkpoints"].values()]
    files += [ASSETS.parent / "fmnist_features.safetensors", ASSETS.parent / "fmnist_features_allconv.safetensors"]
    assert sum(f.stat().st_size for f in files) <= 30 * 2 ** 20
    readme = (ASSETS / "README.md").read_text()
    for name in list(settings["checkpoints"].values()) + list(settings["tuned"].values()):
        assert name in readme


def test_shipped_settings_were_tuned_by_a_committee_that_passed_the_judge_check():
    settings = json.loads(SETTINGS_FILE.read_text())
    check = load_judge_check()
    for name in settings["tuned"].values():
        tuned = json.loads((ASSETS / name).read_text())
        members = tuning_judges(tuned)
        assert len(members) >= 2 and tuned["criterion"] == "fid+kid", name  # a committee, FID and KID
        for member, committed in zip(members, tuned["committee"]):
            assert member["role"] == "tuning" and member["name"] not in REPORTING_JUDGES
            # the committee took only judges that the attacker's edits do not fool, with these very weights
            assert check["judges"][member["name"]]["passed"], member["name"]
            assert check["judges"][member["name"]]["identity"] == member["identity"]
            assert "train" in committed["reference"]["data"] and "test" not in committed["reference"]["data"]
        assert {tuple(p["judges"]) for p in tuned["agreement"]["pairs"]} == {
            (a["name"], b["name"]) for i, a in enumerate(members) for b in members[i + 1:]}


def test_quick_demo_writes_every_file_and_names_its_judges(quick_report):
    for name in ("report.md", "report.json", "rows.json", "fid-vs-nfe.png", "grid-ct1.png", "grid-cd1.png"):
        assert (quick_report / name).is_file(), name
    report = json.loads((quick_report / "report.json").read_text())
    check = load_judge_check()
    panel = report["judge_check"]["panel"]
    assert panel and set(report["reporting_judges"]) == set(panel) <= set(REPORTING_JUDGES)
    assert all(check["judges"][name]["passed"] for name in panel)
    assert ATTACKER not in panel and "fmnist" not in panel
    assert set(report["judge_check"]["judges"]) == set(check["judges"])
    committee = sorted({m["name"] for name in json.loads(SETTINGS_FILE.read_text())["tuned"].values()
                        for m in tuning_judges(json.loads((ASSETS / name).read_text()))})
    assert report["tuning_judge"]["names"] == committee and "fmnist" not in committee
    assert all(report["judge_check"]["judges"][name]["on_committee"] for name in committee)
    assert not set(report["tuning_judge"]["identities"]) & {j["identity"] for j in report["reporting_judges"].values()}
    assert len(report["headline"]) == 2 * report["seeds"] * 8 and report["seeds"] >= 2
    for row in report["headline"] + report["two_step"] + report["objectives"]:
        for judge in panel:
            assert all(math.isfinite(row["judges"][judge][k]) for k in ("fid", "kid", "kid_std", "precision", "recall"))
    pgd_rows = [r for r in report["headline"] if r["boost"] == "joint (PGD)"]
    for control in ("random", "plain classifier"):  # the controls edit by the PGD edit's norm
        rows = [r for r in report["headline"] if r["boost"].startswith(control)]
        assert len(rows) == len(pgd_rows)
        for row, pgd in zip(rows, pgd_rows):
            assert row["mean_l2_change"] == pytest.approx(pgd["mean_l2_change"], rel=0.1), control
    assert len(report["verdicts"]) == 2 * 2 * len(panel)
    assert len(report["panel_verdicts"]) == 4
    for v in report["panel_verdicts"]:
        assert v["judges"] == len(panel) and v["for"] + v["against"] <= len(panel)
    text = (quick_report / "report.md").read_text()
    for words in ("Tuning judge", "Reporting judge", "Compute frontier", "Which judges may report",
                  "The panel's verdict", "plain classifier"):
        assert words in text, words


def test_the_panel_is_the_reporting_candidates_that_passed():
    check = {"judges": {"fmnist": {"passed": True}, "fmnist-allconv": {"passed": True},
                        "fmnist-resnet": {"passed": False}, "fmnist-attacker": {"passed": True},
                        "my-own.safetensors": {"passed": True}, "effnet-lite0@224": {"passed": True}}}
    assert choose_panel(check, ["fmnist", ATTACKER]) == ["fmnist-allconv", "effnet-lite0@224"]


def _paired(method, judge, fid, kid, vs_plain=None, std=1.0):
    change = lambda value, scale: {"change": value, "std": std * scale, "base": 50 * scale}  # noqa: E731
    return {"generator": "CT 1-step", "method": method, "judge": judge, "seeds": 2, "fid": change(fid, 1),
            "kid": change(kid, 1e-3), "vs_plain": vs_plain}


def test_panel_verdicts_count_judges_for_and_against_and_need_the_plain_control_beaten():
    from cmboost.demo.report import panel_sentence
    from cmboost.demo.verdicts import panel_verdicts

    beaten = {"fid": {"change": -5.0, "std": 1.0}, "kid": {"change": -5e-3, "std": 1e-3}}
    paired = [_paired("joint (PGD)", "a", -20, -20e-3, beaten), _paired("joint (PGD)", "b", 20, 20e-3, beaten),
              _paired("joint (SGLD)", "a", -1.9, -30e-3, beaten), _paired("joint (SGLD)", "b", 1, 1e-3, beaten)]
    (pgd, sgld) = panel_verdicts({"paired": paired})
    assert pgd["votes"] == {"a": "for", "b": "against"} and (pgd["for"], pgd["against"]) == (1, 1)
    assert "both directions" in panel_sentence(pgd)
    # FID down by 1.9 stds only: within the noise, whatever KID does
    assert sgld["votes"] == {"a": "neither", "b": "neither"} and "no difference" in panel_sentence(sgld)
    paired[0]["vs_plain"] = {"fid": {"change": -1.0, "std": 1.0}, "kid": {"change": -5e-3, "std": 1e-3}}
    assert panel_verdicts({"paired": paired})[0]["votes"]["a"] == "gain no better than the plain-classifier control"


def test_paired_changes_pool_the_seeds_paired_differences():
    """Per seed, the change against the same images unboosted (and against the plain control's edit of
    them) is the difference of their bootstraps, resample by resample; the seeds pool as a mean with
    std sqrt(sum of variances) / seeds, in the judge's units and relative to the unboosted mean."""
    from cmboost.demo.plan import LABELS, PLAIN_CONTROL
    from cmboost.demo.verdicts import paired_changes

    rng = np.random.default_rng(0)

    def row(seed, key, fid, kid):
        boot = {"fid": {"all": fid, "resampled": list(fid + rng.normal(0, 1, 20))},
                "kid": {"all": kid, "resampled": list(kid + rng.normal(0, 1e-3, 20))}}
        return {"generator": "CD 1-step", "seed": seed, "boost": LABELS[key], "key": key,
                "judges": {"j": {"fid": fid, "kid": kid, "bootstrap": boot}}}

    headline = [row(1, "none", 40.0, 0.04), row(1, PLAIN_CONTROL, 39.0, 0.05), row(1, "pgd", 36.0, 0.03),
                row(2, "none", 44.0, 0.06), row(2, PLAIN_CONTROL, 45.0, 0.05), row(2, "pgd", 42.0, 0.05)]
    (entry,) = paired_changes(headline, ["j"])
    assert (entry["method"], entry["key"], entry["judge"], entry["seeds"]) == ("joint (PGD)", "pgd", "j", 2)
    by = {(r["seed"], r["key"]): r["judges"]["j"]["bootstrap"] for r in headline}
    for metric, rival, key in (("fid", "none", None), ("kid", "none", None), ("fid", PLAIN_CONTROL, "vs_plain")):
        stds = [np.std(np.subtract(by[s, "pgd"][metric]["resampled"], by[s, rival][metric]["resampled"]), ddof=1)
                for s in (1, 2)]
        changes = [by[s, "pgd"][metric]["all"] - by[s, rival][metric]["all"] for s in (1, 2)]
        got = entry[metric] if key is None else entry[key][metric]
        assert got["change"] == pytest.approx(np.mean(changes))
        assert got["std"] == pytest.approx(np.sqrt(stds[0] ** 2 + stds[1] ** 2) / 2)
    assert entry["fid"]["relative"] == pytest.approx(-3.0 / 42.0)  # -4 and -2 against a mean of 42
    assert paired_changes([r for r in headline if r["boost"] == "none"], ["j"]) == []  # no method rows, nothing


def test_quick_demo_is_deterministic_on_one_machine(quick_report, tmp_path):
    """Half of the quick demo's rows (every other one, so every kind of row: samples, methods,
    controls, bars, objectives, frontier), its samples and its figures are made again from nothing in
    a copy of its folder; the report and the grids must come out the same to the last bit. (Half, not
    all: the other half is the first run's, and this is the suite's slowest end-to-end path.)"""
    again = tmp_path / "again"
    shutil.copytree(quick_report, again)
    rows = json.loads((again / "rows.json").read_text())
    boosted_by_pgd = lambda key: json.loads(key)[3:4] == ["pgd"]  # noqa: E731  (the grids' rows among them)
    kept = {key: row for i, (key, row) in enumerate(rows.items()) if i % 2 and not boosted_by_pgd(key)}
    assert 0 < len(kept) < len(rows) and any(boosted_by_pgd(key) for key in rows)
    (again / "rows.json").write_text(json.dumps(kept))
    shutil.rmtree(again / "samples")
    for name in ("report.json", "report.md", "grid-ct1.png", "grid-cd1.png", "fid-vs-nfe.png"):
        (again / name).unlink()
    assert cli_main(["demo", "--quick", "--out-dir", str(again), "--device", "cpu", "--quiet"]) == 0
    assert len(json.loads((again / "rows.json").read_text())) == len(rows)
    first = _strip_timings(json.loads((quick_report / "report.json").read_text()))
    second = _strip_timings(json.loads((again / "report.json").read_text()))
    for report in (first, second):  # file paths, which name the two folders
        report.pop("plot"), report.pop("grids")
    assert json.dumps(first, sort_keys=True) == json.dumps(second, sort_keys=True)
    for grid in ("grid-ct1.png", "grid-cd1.png"):
        assert (quick_report / grid).read_bytes() == (again / grid).read_bytes(), grid


def test_quick_demo_reproduces_the_committed_numbers_within_their_error(quick_report):
    ours = json.loads((quick_report / "report.json").read_text())
    committed = json.loads(COMMITTED_QUICK.read_text())
    assert (ours["num_samples"], ours["seeds"]) == (committed["num_samples"], committed["seeds"])
    assert ours["reporting_judges"] == committed["reporting_judges"]
    assert len(ours["headline"]) == len(committed["headline"])
    spread, paired = pooled_seed_std(committed["headline"]), paired_seed_std(committed["headline"])
    base = {tuple(r[k] for k in ("gen", "seed")): r for r in committed["headline"] if r["boost"] == "none"}
    our_base = {tuple(r[k] for k in ("gen", "seed")): r for r in ours["headline"] if r["boost"] == "none"}
    for mine, theirs in zip(ours["headline"], committed["headline"]):
        where = (mine["gen"], mine["seed"])
        assert where + (mine["boost"],) == (theirs["gen"], theirs["seed"], theirs["boost"])
        for judge in committed["reporting_judges"]:
            m, t = mine["judges"][judge], theirs["judges"][judge]
            for key in COMPARED:
                if mine["boost"] == "none":
                    ours_value, theirs_value, s = m[key], t[key], spread[(mine["gen"], judge, key)]
                else:  # the change from the same seed's unboosted row
                    ours_value = m[key] - our_base[where]["judges"][judge][key]
                    theirs_value = t[key] - base[where]["judges"][judge][key]
                    s = paired[(mine["gen"], judge, key)]
                bound = SEED_SPREAD_BOUND * s
                if key == "kid":
                    bound = max(bound, SEED_SPREAD_BOUND * math.hypot(m["kid_std"], t["kid_std"]))
                assert abs(ours_value - theirs_value) <= bound, where + (mine["boost"], judge, key)


def test_the_error_bound_is_tighter_than_the_effects_it_must_see():
    """The bound must still catch a broken booster: in the committed numbers, for each generator, some
    panel judge sees the norm-matched random edit move the FID by more than the (paired) bound on every seed."""
    committed = json.loads(COMMITTED_QUICK.read_text())
    spread = paired_seed_std(committed["headline"])
    rows = {(r["gen"], r["seed"], r["boost"]): r for r in committed["headline"]}
    for gen in sorted({r["gen"] for r in committed["headline"]}):
        seeds = sorted({seed for (g, seed, _) in rows if g == gen})
        random_edit = next(boost for (g, _, boost) in rows if g == gen and boost.startswith("random"))

        def caught(judge: str) -> bool:
            bound = SEED_SPREAD_BOUND * spread[(gen, judge, "fid")]
            return all(abs(rows[(gen, seed, random_edit)]["judges"][judge]["fid"]
                           - rows[(gen, seed, "none")]["judges"][judge]["fid"]) > bound for seed in seeds)

        assert any(caught(judge) for judge in committed["reporting_judges"]), gen


def test_rerun_prints_the_finished_report_without_redoing_it(quick_report, capsys):
    before = (quick_report / "report.json").stat().st_mtime_ns
    assert cli_main(["demo", "--quick", "--out-dir", str(quick_report), "--device", "cpu"]) == 0
    assert "already done" in capsys.readouterr().out
    assert (quick_report / "report.json").stat().st_mtime_ns == before
    for size in ([], ["--full"]):  # the standard or the full demo over a quick report: refused, named
        assert cli_main(["demo", *size, "--out-dir", str(quick_report), "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert "holds a quick report" in err and err.count("\n") == 1
    assert cli_main(["demo", "--quick", "--full", "--out-dir", str(quick_report), "--device", "cpu"]) == 2
    assert "--quick and --full" in capsys.readouterr().err


def test_torn_report_bad_threads_and_unreadable_markdown_are_one_line(tmp_path, capsys):
    out = tmp_path / "d"
    out.mkdir()
    (out / "report.json").write_text('{"mode": "qu')  # torn by a crash mid-write (by another tool)
    assert cli_main(["demo", "--quick", "--out-dir", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "not a readable demo report" in err and "--overwrite" in err and err.count("\n") == 1
    (out / "report.json").write_text('{"mode": "quick"}')
    (out / "report.md").mkdir()  # cannot be read as a file
    assert cli_main(["demo", "--quick", "--out-dir", str(out), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "cannot read the finished demo's report" in err and "cannot write" not in err
    for threads in ("-1", "-8"):
        assert cli_main(["demo", "--quick", "--out-dir", str(tmp_path / "t"), "--threads", threads]) == 2
        err = capsys.readouterr().err
        assert f"--threads {threads}: must be >= 0" in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()


def test_the_report_says_per_generator_whether_to_boost():
    from cmboost.demo.plan import tune_answer
    from cmboost.demo.report import _answer_section

    change = {"change": -0.2, "std": 0.05, "base": 20.0, "relative": -0.01, "relative_std": 0.0025, "beyond_noise": True}
    confirmed = {"best": "sgld", "decision": {"best": "sgld", "reason": "sgld {...}, chosen ..., confirmed",
                                              "judges": {"t1": {"fid": change, "kid": change, "confirmed": True}}}}
    refused = {"best": "none", "decision": {"best": "none", "reason": "pgd {...} is not confirmed on the other half: "
                                                                       "t1 FID +1.0%", "judges": {}}}
    answers = {"CT 1-step": tune_answer(confirmed), "CD 1-step": tune_answer(refused)}
    lines = _answer_section({"answers": answers})
    assert lines[0].startswith("## Should you boost?")
    assert "- **CT 1-step**: boost with sgld; confirmed change t1 FID -1.0% ± 0.2%, KID -1.0% ± 0.2%." in lines
    assert any(line.startswith("- **CD 1-step**: tuning found no setting that helps. pgd") for line in lines)
    assert _answer_section({}) == []


def test_the_tuning_answer_sits_beside_the_panels_verdict():
    from cmboost.demo.report import answers_beside_verdict

    votes = [{"generator": "CT 1-step", "method": "joint (SGLD)", "for": 2, "against": 0, "judges": 3},
             {"generator": "CD 1-step", "method": "joint (PGD)", "for": 0, "against": 1, "judges": 3}]
    answers = {"CT 1-step": {"best": "sgld"}, "CD 1-step": {"best": "none"}, "CT 2-step": {"best": "sgld"}}
    lines = answers_beside_verdict({"panel_verdicts": votes, "answers": answers})
    assert "- CT 1-step: tuning says boost with sgld; the panel: 2 of 3 judges for it, 0 against." in lines
    assert "- CD 1-step: tuning found no setting that helps; the panel: joint (PGD) 0 for, 1 against." in lines
    assert not any("2-step" in line for line in lines)  # no panel verdict on the 2-step rows
    assert answers_beside_verdict({"panel_verdicts": votes}) == []


def _gain_map_module():
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "recipes" / "gain_map.py"
    spec = importlib.util.spec_from_file_location("gain_map", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _judged(fid: float, kid: float, std: float = 0.01) -> dict:
    return {name: {"change": value, "std": std, "relative": value, "relative_std": std,
                   "beyond_noise": abs(value) > 2 * std} for name, value in (("fid", fid), ("kid", kid))}


def test_the_levers_rule_needs_two_judges_the_controls_beaten_and_none_against():
    gain_map = _gain_map_module()
    panel = ["a", "b", "c"]
    controls = {"unsharp mask (tuned control)": {"judges": {j: _judged(-0.12, -0.12) for j in panel}},
                "BIGRoC (tuned)": {"judges": {j: _judged(0.0, 0.0) for j in panel}}}

    def verdict(**judges):
        row = {"methods": {"edit": {"judges": judges}, **controls}}
        return gain_map.meets_rule(row, "edit", panel)

    wins = verdict(a=_judged(-0.2, -0.3), b=_judged(-0.15, -0.2), c=_judged(0.0, 0.0))
    assert wins == {"met": True, "judges_for": ["a", "b"], "judges_against": []}
    assert not verdict(a=_judged(-0.2, -0.3), b=_judged(-0.15, -0.2), c=_judged(0.1, 0.1))["met"]  # one against
    assert not verdict(a=_judged(-0.2, -0.3), b=_judged(-0.11, -0.2), c=_judged(0.0, 0.0))["met"]  # unsharp wins b
    assert not verdict(a=_judged(-0.2, -0.05), b=_judged(-0.15, -0.2), c=_judged(0.0, 0.0))["met"]  # KID short of 10%
    noisy = {j: _judged(-0.2, -0.2, std=0.15) for j in panel}
    assert not verdict(**noisy)["met"]  # inside 2 stds


def test_the_full_report_shows_the_shipped_gain_map_and_counts_the_levers(tmp_path, monkeypatch):
    import cmboost.demo.assets as demo
    from cmboost.demo.report import _gain_map_section
    from cmboost.errors import UserInputError

    summary = demo.load_gain_map()
    assert summary is not None, "the recipe's gain map summary is shipped"
    text = "\n".join(_gain_map_section({"gain_map": summary}))
    judged = sum(len(g["rule"]) for g in summary["generators"])
    met = sum(v["met"] for g in summary["generators"] for v in g["rule"].values())
    assert judged >= 2 and f"**{met} of {judged} edits meet it**" in text
    for judge in summary["panel"]:
        assert f"{judge} FID" in text  # every figure names its judge
    for gen in summary["generators"]:
        assert f"| {gen['generator']} | {gen['realness_auc']:.2f} | {gen['tune']} |" in text
    assert "No gain map was shipped" in "\n".join(_gain_map_section({}))
    (tmp_path / demo.GAIN_MAP_FILE).write_text(json.dumps({"format": "other"}))
    monkeypatch.setattr(demo, "ASSETS", tmp_path)
    with pytest.raises(UserInputError, match="gain-map.json: not a cmboost.gain-map-summary/1 file"):
        demo.load_gain_map()
