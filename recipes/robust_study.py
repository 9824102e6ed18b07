"""Boosting gain against robustness, across joint networks (recipe stage robust-study).

For every joint network and every L2 radius it boosts the same generated samples with PGD (no early
stop, so every edit reaches the radius it is given), and scores the result with each judge of the
validated panel (the reporting judges that passed `cmboost check-judges`) against the test split. Beside
each radius it scores a control that knows nothing of any network: every image moved by the same L2
norm as the first network's edit, in a random direction. Each FID change carries a paired bootstrap std
(the same images before and after). The judge-free side of the relation (robust accuracy at the radius,
gradient-score alignment, realness AUC) is read from each network's `cmboost diagnose` report.

    python recipes/robust_study.py --net joint-w24=PATH ... --samples ct1=PATH --samples cd1=PATH \
        --diagnose-dir runs/diagnose --out runs/robust-study

Features of every scored set are cached in --out, so a rerun resumes; study.json and study.md are the
results.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cmboost.files.atomic import atomic_write_text
from cmboost.boosting.controls import random_perturbation
from cmboost.files.datasets import load_dataset
from cmboost.jcd.model import load_joint_model
from cmboost.metrics.features import load_feature_extractor
from cmboost.metrics.prepared import ReferenceStatistics
from cmboost.metrics.judge_check import fid_kid, paired_bootstrap_std, passing, pool_features
from cmboost.metrics.judges import REPORTING_JUDGES
from cmboost.files.report import markdown_table
from cmboost.files.samples import load_samples, to_float, to_uint8
from cmboost.boosting.apply import run_method

JUDGE_CHECK = Path(__file__).resolve().parent.parent / "cmboost" / "assets" / "fmnist" / "judges.json"
PGD_STEPS = 10            # the tuned grid's step count; the step size is the default 2.5 eps / steps
REFERENCE_COUNT = 5000    # test images whose features make the reference (the judge check's count)
BOOTSTRAP = 20            # paired bootstrap resamples per FID change
CONTROL_SEED = 17


def named(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in pairs:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            sys.exit(f"{flag} {item!r}: expected NAME=PATH")
        if not Path(path).is_file():
            sys.exit(f"{flag} {item!r}: {path} does not exist")
        out[name] = path
    return out


def cached_features(cache: Path, extractor, images_u8: np.ndarray) -> np.ndarray:
    if cache.is_file():
        return np.load(cache)
    features = pool_features(extractor, images_u8)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, features)
    tmp.replace(cache)
    return features


def diagnostic_row(path: Path, radii: list[float]) -> dict:
    """Robust accuracy at each radius, the alignment cosine on real images (mean over noise levels),
    and the realness AUC after the diagnose boost, from one diagnose.json (empty when absent)."""
    if not path.is_file():
        return {}
    report = json.loads(path.read_text())
    robust = {float(r["eps"]): r["accuracy"] for r in report["accuracy"]["robust"]}
    row = {"clean_accuracy": report["accuracy"]["clean"],
           "robust_accuracy": {f"{e:g}": robust.get(float(e)) for e in radii}}
    alignment = report.get("alignment") or {}
    real = [r["mean"] for r in alignment.get("real", []) if isinstance(r, dict) and "mean" in r]
    row["alignment_real"] = float(np.mean(real)) if real else None
    row["auc_after"] = {g: v["after"]["auc"] for g, v in report["realness"]["generators"].items()}
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--net", action="append", required=True, help="NAME=PATH of a joint network; repeat")
    p.add_argument("--samples", action="append", required=True, help="NAME=PATH of labelled samples; repeat")
    p.add_argument("--radii", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    p.add_argument("--num", type=int, default=500, help="images used from each samples file, its first ones")
    p.add_argument("--diagnose-dir", default=None, help="folder of radius-NAME/diagnose.json")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    nets, sample_files = named(args.net, "--net"), named(args.samples, "--samples")
    out = Path(args.out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    check = json.loads(JUDGE_CHECK.read_text())
    panel = [n for n in passing(check) if n in REPORTING_JUDGES]
    print(f"panel: {', '.join(panel)}", flush=True)
    extractors = {name: load_feature_extractor(name, "cpu") for name in panel}
    real, _, _ = load_dataset("fmnist", "test", image_size=32)
    refs = {name: ReferenceStatistics.of(cached_features(out / "features" / f"ref-{name}.npy", ex,
                                                        real[:REFERENCE_COUNT]))
            for name, ex in extractors.items()}

    rows = []
    for gen, path in sample_files.items():
        images_u8, labels = load_samples(path)
        images_u8, labels = images_u8[:args.num], np.asarray(labels[:args.num], dtype=np.int64)
        base = {j: cached_features(out / "features" / f"{gen}-base-{j}.npy", ex, images_u8)
                for j, ex in extractors.items()}
        base_scores = {j: fid_kid(refs[j], base[j]) for j in panel}
        rows.append({"generator": gen, "edit": "none", "eps": 0.0, "mean_l2": 0.0,
                     "judges": {j: {**base_scores[j], "fid_change": 0.0, "fid_change_std": 0.0} for j in panel}})
        for eps in args.radii:
            control_norms = None
            for net_name, net_path in list(nets.items()) + [("random", None)]:
                tag = f"{gen}-{net_name}-eps{eps:g}"
                done = all((out / "features" / f"{tag}-{j}.npy").is_file() for j in panel)
                norms_file = out / "features" / f"{tag}-l2.npy"
                if net_path is not None:
                    if done and norms_file.is_file():
                        edited, norms = None, np.load(norms_file)
                    else:
                        model = load_joint_model(net_path)
                        hyper = {"eps": eps, "steps": PGD_STEPS, "threshold": None}
                        edited, norms = run_method("pgd", hyper, model, None, images_u8, labels, "cpu")
                        np.save(norms_file, norms)
                    if control_norms is None:
                        control_norms = norms  # the random control matches the first network's edits
                else:
                    norms = control_norms
                    edited = None if done else to_uint8(random_perturbation(
                        to_float(images_u8), torch.as_tensor(norms, dtype=torch.float32), CONTROL_SEED))
                feats = {j: cached_features(out / "features" / f"{tag}-{j}.npy", ex, edited)
                         for j, ex in extractors.items()}
                row = {"generator": gen, "edit": net_name, "eps": eps, "mean_l2": float(np.mean(norms)), "judges": {}}
                for j in panel:
                    score = fid_kid(refs[j], feats[j])
                    change = (score["fid"] - base_scores[j]["fid"]) / base_scores[j]["fid"]
                    std = paired_bootstrap_std(refs[j], base[j], feats[j], BOOTSTRAP, seed=0) / base_scores[j]["fid"]
                    row["judges"][j] = {**score, "fid_change": change, "fid_change_std": std,
                                        "kid_change": (score["kid"] - base_scores[j]["kid"]) / base_scores[j]["kid"]}
                rows.append(row)
                print(f"{tag}: mean L2 {row['mean_l2']:.2f}; " + "; ".join(
                    f"{j} FID {row['judges'][j]['fid_change']:+.1%} ± {row['judges'][j]['fid_change_std']:.1%}"
                    for j in panel), flush=True)

    diagnostics = {name: diagnostic_row(Path(args.diagnose_dir) / f"radius-{name}" / "diagnose.json", args.radii)
                   for name in nets} if args.diagnose_dir else {}
    result = {"format": "cmboost.robust-study/1", "panel": panel, "nets": nets, "samples": sample_files,
              "num": args.num, "pgd_steps": PGD_STEPS, "radii": args.radii, "reference": f"fmnist test[:{REFERENCE_COUNT}]",
              "bootstrap": BOOTSTRAP, "rows": rows, "diagnostics": diagnostics}
    atomic_write_text(out / "study.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "study.md", render(result))
    print(render(result))
    return 0


def _table(header: list[str], body: list[list[str]]) -> str:
    return markdown_table([dict(zip(header, cells)) for cells in body], header)


def render(result: dict) -> str:
    panel, lines = result["panel"], []
    lines.append(f"PGD, {result['pgd_steps']} steps, no early stop; {result['num']} images per generator; FID change "
                 f"against the unboosted samples ± paired-bootstrap std ({result['bootstrap']} resamples), reference "
                 f"{result['reference']}. Judges: {', '.join(panel)} (the validated panel).\n")
    header = ["generator", "edit", "eps", "mean L2"] + [f"{j} FID" for j in panel] + ["panel mean"]
    body = []
    for r in result["rows"]:
        changes = [r["judges"][j]["fid_change"] for j in panel]
        body.append([r["generator"], r["edit"], f"{r['eps']:g}", f"{r['mean_l2']:.2f}"]
                    + [f"{r['judges'][j]['fid']:.1f} ({r['judges'][j]['fid_change']:+.0%} ± "
                       f"{r['judges'][j]['fid_change_std']:.0%})" for j in panel]
                    + [f"{np.mean(changes):+.1%}"])
    lines.append(_table(header, body))
    if result["diagnostics"]:
        radii = result["radii"]
        header = ["network", "clean acc"] + [f"robust acc @{e:g}" for e in radii] + \
                 ["alignment (real)", "AUC after eps-2 PGD (ct1, cd1)"]
        body = []
        for name, d in result["diagnostics"].items():
            if not d:
                continue
            body.append([name, f"{d['clean_accuracy']:.2f}"]
                        + [f"{d['robust_accuracy'][f'{e:g}']:.2f}" if d['robust_accuracy'][f'{e:g}'] is not None
                           else "n/a" for e in radii]
                        + [f"{d['alignment_real']:.3f}" if d["alignment_real"] is not None else "n/a",
                           ", ".join(f"{v:.2f}" for v in d["auc_after"].values())])
        lines.append("\nJudge-free diagnostic (`cmboost diagnose`, 500 held-out real images, 20-step L2 PGD):\n")
        lines.append(_table(header, body))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
