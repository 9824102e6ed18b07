"""The demo's numbers judged: mean and std over seeds, the verdicts against the targets, the paired changes
under each judge, and what a miss comes from."""

from __future__ import annotations

import numpy as np

from cmboost.demo.plan import JOINT_METHODS, LABELS, PLAIN_CONTROL, RIVALS, method_key
from cmboost.metrics.prepared import paired_change
from cmboost.records import field_default
from cmboost.tuning.candidates import ERROR_BARS, TuneSettings

TARGET_CUT = 0.25          # FID and KID lowered by at least 25%


# Recall may drop by at most this much: the slack tune allows its candidates.
RECALL_SLACK = field_default(TuneSettings, "max_recall_drop")


def summarise(headline: list[dict]) -> list[dict]:
    """One row per (generator, boost): each reporting judge's FID, KID, IS, precision and recall as
    mean and std over the sample seeds (ddof 1), and the mean L2 change per image. IS is None under a
    judge without a classifier head."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in headline:
        groups.setdefault((row["generator"], method_key(row)), []).append(row)
    out = []
    for (generator, key), rows in groups.items():
        entry = {"generator": generator, "boost": rows[0]["boost"], "key": key, "seeds": len(rows),
                 "mean_l2_change": float(np.mean([r["mean_l2_change"] for r in rows])), "judges": {}}
        for judge in rows[0]["judges"]:
            values = {k: np.array([r["judges"][judge][k] for r in rows], dtype=float)
                      for k in ("fid", "kid", "precision", "recall")
                      + (("is",) if all(r["judges"][judge].get("is") is not None for r in rows) else ())}
            entry["judges"][judge] = {
                **{f"{k}_mean": float(v.mean()) for k, v in values.items()},
                **{f"{k}_std": float(v.std(ddof=1)) if len(v) > 1 else 0.0 for k, v in values.items()}}
        out.append(entry)
    return out


def _beats(a: dict, b: dict, key: str) -> bool:
    """a is lower than b beyond both error bars: mean_a + std_a < mean_b - std_b."""
    return a[f"{key}_mean"] + a[f"{key}_std"] < b[f"{key}_mean"] - b[f"{key}_std"]


def verdicts(report: dict) -> list[dict]:
    """Each joint method on each headline generator under each reporting judge, against each target."""
    found = []
    by = {(s["generator"], method_key(s)): s for s in report["summary"]}
    for (generator, key), entry in by.items():
        if key not in JOINT_METHODS:
            continue
        base = by[(generator, "none")]
        for judge, m in entry["judges"].items():
            b = base["judges"][judge]
            cut = {k: 1.0 - m[f"{k}_mean"] / b[f"{k}_mean"] for k in ("fid", "kid")}
            checks = {"FID cut >= 25%": cut["fid"] >= TARGET_CUT, "KID cut >= 25%": cut["kid"] >= TARGET_CUT,
                      f"recall kept (within {RECALL_SLACK:g})": b["recall_mean"] - m["recall_mean"] <= RECALL_SLACK}
            for rival in RIVALS:
                r = by[(generator, rival)]["judges"][judge]
                checks[f"beats {LABELS[rival].replace(' (control)', '')}"] = _beats(m, r, "fid") and _beats(m, r, "kid")
            found.append({"generator": generator, "method": entry["boost"], "judge": judge,
                          "fid_cut": cut["fid"], "kid_cut": cut["kid"], "checks": checks,
                          "met": all(checks.values())})
    return found


def summarise_check(check: dict, panel: list[str], committee: list[str] = ()) -> dict:
    """The judge check in the report: per candidate, its clean FID, ladder, worst transfer edit and verdict
    (`committee`: the tuning judges that chose the settings)."""
    rows = {}
    for name, r in check["judges"].items():
        if "unavailable" in r:
            rows[name] = {"passed": False, "in_panel": False, "unavailable": r["unavailable"]}
            continue
        worst = min(r["transfer"]["edits"], key=lambda e: e["relative_fid_change"])
        rows[name] = {"passed": r["passed"], "in_panel": name in panel, "on_committee": name in committee,
                      "identity": r["identity"],
                      "clean_fid": r["clean"]["fid"], "unedited_fid": r["transfer"]["none"]["fid"],
                      "ladders": {f: [s["fid"] for s in v["steps"]] for f, v in r["ladder"].items()},
                      "ladder_monotonic": r["ladder_monotonic"],
                      "edits": [{k: e[k] for k in ("eps", "mean_l2_change", "fid_change", "relative_fid_change",
                                                   "bootstrap_std", "random_fid_change", "rewarded")}
                                | {"adversarial_fid": e["adversarial"]["fid"], "random_fid": e["random"]["fid"]}
                                for e in r["transfer"]["edits"]],
                      "worst_relative_fid_change": worst["relative_fid_change"], "reasons": r["reasons"]}
    return {"attacker": check["attacker"], "data": check["data"], "panel": panel, "judges": rows}


def _pooled(rows: dict, generator: str, seeds: list, method: str, rival: str, judge: str) -> dict:
    """The paired change of `method` against `rival` on the same images, pooled over the seeds: the mean
    change, with std sqrt(sum of the seeds' variances) / seeds."""
    changes = [paired_change(rows[generator, seed, rival]["judges"][judge]["bootstrap"],
                             rows[generator, seed, method]["judges"][judge]["bootstrap"]) for seed in seeds]
    return {metric: {"change": float(np.mean([c[metric]["change"] for c in changes])),
                     "std": float(np.sqrt(sum(c[metric]["std"] ** 2 for c in changes)) / len(changes))}
            for metric in ("fid", "kid")}


def paired_changes(headline: list[dict], judges: list[str]) -> list[dict]:
    """Per joint method, headline generator and judge: how the method changes FID and KID against the
    same images unboosted ("fid", "kid") and against the plain-classifier control's edit of them
    ("vs_plain"), each a paired difference with its paired-bootstrap std, pooled over the seeds
    (`_pooled`), and relative to the unboosted mean. Paired differences resolve changes of a few
    percent that the spread between seeds hides. Reads the rows' "bootstrap" (the demo's paired rows)."""
    rows = {(r["generator"], r["seed"], method_key(r)): r for r in headline}
    found = []
    for generator in dict.fromkeys(r["generator"] for r in headline):
        seeds = list(dict.fromkeys(r["seed"] for r in headline if r["generator"] == generator))
        with_plain = (generator, seeds[0], PLAIN_CONTROL) in rows
        for method in (m for m in JOINT_METHODS if (generator, seeds[0], m) in rows):
            for judge in judges:
                entry = {"generator": generator, "method": LABELS[method], "key": method, "judge": judge,
                         "seeds": len(seeds),
                         **_pooled(rows, generator, seeds, method, "none", judge),
                         "vs_plain": _pooled(rows, generator, seeds, method, PLAIN_CONTROL, judge) if with_plain
                         else None}
                for metric in ("fid", "kid"):
                    base = float(np.mean([rows[generator, seed, "none"]["judges"][judge][metric] for seed in seeds]))
                    entry[metric].update(base=base, relative=entry[metric]["change"] / base,
                                         relative_std=entry[metric]["std"] / base)
                found.append(entry)
    return found


def _below(change: dict) -> bool:
    return change["change"] < -ERROR_BARS * change["std"]


def _above(change: dict) -> bool:
    return change["change"] > ERROR_BARS * change["std"]


def panel_verdicts(report: dict) -> list[dict]:
    """For each joint method on each headline generator, how many panel judges are for it, against it,
    or neither, from the paired changes (`paired_changes`). A judge is *for* when FID and KID fall by
    more than ERROR_BARS paired-bootstrap stds and the method also beats the plain-classifier control
    on the same images by as much (else the gain is one an adversarial edit also gets); *against* when
    FID and KID rise by more than ERROR_BARS stds."""
    grouped: dict[tuple[str, str], dict[str, str]] = {}
    for p in report["paired"]:
        gain = _below(p["fid"]) and _below(p["kid"])
        beyond_control = p["vs_plain"] is None or (_below(p["vs_plain"]["fid"]) and _below(p["vs_plain"]["kid"]))
        if gain and beyond_control:
            vote = "for"
        elif _above(p["fid"]) and _above(p["kid"]):
            vote = "against"
        else:
            vote = "gain no better than the plain-classifier control" if gain else "neither"
        grouped.setdefault((p["generator"], method_key(p)), {})[p["judge"]] = vote
    found = []
    for (generator, key), votes in grouped.items():
        count = {k: sum(v == k for v in votes.values()) for k in ("for", "against")}
        found.append({"generator": generator, "method": LABELS[key], "key": key, "votes": votes, "for": count["for"],
                      "against": count["against"], "judges": len(votes)})
    return found


def generator_bar(report: dict) -> list[dict]:
    """Each headline generator, unboosted, against real held-out images blurred with sigma 1."""
    blur = next(r for name, r in report["bars"].items() if "blur" in name)["judges"]
    rows = []
    for s in report["summary"]:
        if method_key(s) != "none":
            continue
        for judge, m in s["judges"].items():
            ok = m["fid_mean"] <= blur[judge]["fid"] and m["kid_mean"] <= blur[judge]["kid"]
            rows.append({"generator": s["generator"], "judge": judge, "FID": f"{m['fid_mean']:.2f}",
                         "blur FID": f"{blur[judge]['fid']:.2f}", "KID×1e3": f"{1e3 * m['kid_mean']:.1f}",
                         "blur KID×1e3": f"{1e3 * blur[judge]['kid']:.1f}", "reaches the bar": "yes" if ok else "**no**"})
    return rows


def miss_causes(report: dict) -> list[str]:
    """The measured causes a miss can have, each with its number: the booster's robustness at the radius
    it boosts at, its gradient-score alignment, and the generators against the blur bar."""
    causes = []
    d, radius = report.get("diagnostic"), report.get("booster_radius")
    pgd_eps = sorted({t["pgd"]["eps"] for t in report["tuned"].values() if "pgd" in t})
    if d:
        acc = d["accuracy"]
        at = {r["eps"]: r["accuracy"] for r in acc["robust"]}
        cells = [f"{at[e]:.0%} at eps {e:g}" for e in pgd_eps if e in at]
        causes.append(f"Robust radius: the booster was trained against L2 eps {radius:g} attacks; the tuned PGD "
                      f"boosts at eps {', '.join(f'{e:g}' for e in pgd_eps)}; its robust accuracy there is "
                      f"{', '.join(cells) or 'not measured'} (clean {acc['clean']:.0%}). Below about 50%, part of "
                      "each edit is an adversarial example of the booster rather than a better image."
                      if radius is not None else
                      f"Robust radius: the booster records none; the tuned PGD boosts at eps "
                      f"{', '.join(f'{e:g}' for e in pgd_eps)}.")
        if d.get("alignment"):
            real = [r["mean"] for r in d["alignment"]["real"] if r["mean"] is not None]
            if real:
                causes.append(f"Alignment: the cosine between the booster's grad log p(y|x) and the EDM teacher's "
                              f"score on real images is {min(real):.3f}-{max(real):.3f} (1: the booster pushes "
                              "toward the data; 0: in unrelated directions).")
    short = [r for r in generator_bar(report) if r["reaches the bar"] != "yes"]
    if short:
        causes.append("Generators: " + "; ".join(f"{r['generator']} FID {r['FID']} against the blur bar "
                                                  f"{r['blur FID']} ({r['judge']})" for r in short)
                      + ". Boosting edits images within a small radius; it cannot make up a gap of this size.")
    return causes
