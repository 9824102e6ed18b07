"""Where boosting pays: the gain of every boosting method against the quality of the generator it boosts
(recipe stage gain-map; issue "Know when boosting pays").

For each generator (the shipped ECT and CD-long at 1 and 2 steps, and the older, weaker CT and CD at 1
step) it draws `--num` images and, under every judge of the validated panel (the reporting judges that
passed `cmboost check-judges`), against the test split's shipped statistics, measures:
- the generator's own FID, KID, precision and recall, and its precision deficit against held-out real
  images (the same count, scored the same way);
- the booster's realness AUC on it: how well the joint network tells these samples from held-out real
  images (0.5: not at all);
- the change of FID and KID that each method makes, with its paired-bootstrap std (the same images
  resampled before and after): joint PGD at several radii (no early stop, so each edit reaches its
  radius), joint SGLD, classifier-only BIGRoC and the unsharp-mask control with the settings the shipped
  tune file chose for CT 1-step, and the cheapest alternative, one more generator step (the same seed,
  so image i starts from the same noise: paired too);
- `cmboost tune`'s answer for that generator: a committee tune of a small grid on other (validation)
  samples, against training statistics, with its choose-half / confirm-half rule.
One booster boosts every generator, the shipped `jcd-robust-1.5-ect` (trained on ECT and CD-long
samples): a gain that changes across generators is then the generator's doing, not the booster's.

    python recipes/gain_map.py --train-refs DIR --out runs/gain-map

Features and edits of every set are cached in --out, so a rerun resumes. Writes map.json, map.md and
gain-vs-quality.png there.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from cmboost.files.atomic import atomic_write_text
from cmboost.boosting.boost import trained_realness_kind
from cmboost.cm.sample import SampleRun, sample
from cmboost.files.datasets import FMNIST_HELD_OUT_START, load_dataset
from cmboost.demo.plan import choose_panel
from cmboost.demo.assets import ASSETS, load_judge_check, load_shipped_reference
from cmboost.diagnostic.measures import rank_auc, realness_and_prob
from cmboost.jcd.model import load_joint_model
from cmboost.metrics.evaluate import prepared_statistics
from cmboost.metrics.features import load_feature_extractor
from cmboost.metrics.judge_check import pool_features
from cmboost.metrics.reference import load_reference
from cmboost.metrics.stats import feature_statistics
from cmboost.metrics.prepared import paired_change
from cmboost.files.report import markdown_table
from cmboost.files.samples import load_samples, to_float
from cmboost.tuning.candidates import TuneSettings
from cmboost.tuning.choose import ResolvedTune, run_tune
from cmboost.boosting.apply import run_method

BOOSTER = "jcd-robust-1.5-ect.safetensors"
CLASSIFIER = "jcd-ce.safetensors"       # BIGRoC's classifier, as in the demo
# Other networks, for the levers of recipes/README.md ("A booster built to win"): the old booster, and a
# network whose realness head is a sigmoid D(x, y), the only kind for which a realness-only edit differs
# from joint PGD (with the softmax head of the shipped booster, log D(x, y) = log p(y|x), and the joint
# score is twice that: L2-normalised steps make realness-only, classifier-only and joint PGD one edit).
OLD_BOOSTER = "jcd-joint-w24.safetensors"
SIGMOID_NET = "jcd-ce+bce.safetensors"
LEVER_RADIUS = 1.0
TUNED = "tuned-ct1.json"                # SGLD, BIGRoC and unsharp settings: the shipped choice for CT 1-step
PGD_RADII = (0.5, 1.0, 1.5, 2.0)
PGD_STEPS = 10
BOOTSTRAP = 30                          # paired-bootstrap resamples per change (1280-d judges make each costly)
COMMITTEE = ("fmnist-tune-allconv", "fmnist-tune-resnet")
# name: (checkpoint, steps, the next step's schedule or None for the default, what it is)
GENERATORS = {
    "ECT 1-step": ("ect.safetensors", 1, None, "shipped CT (ECT-style), 1 step"),
    "CD-long 1-step": ("cd-long.safetensors", 1, None, "shipped CD, 1 step"),
    "ECT 2-step": ("ect.safetensors", 2, {"ts": [0, 20, 28, 39], "N": 40}, "shipped CT (ECT-style), 2 steps"),
    "CD-long 2-step": ("cd-long.safetensors", 2, {"ts": [0, 6, 12, 17], "N": 18}, "shipped CD, 2 steps"),
    "old CT 1-step": ("ct.safetensors", 1, None, "the first CT (350 iterations), 1 step"),
    "old CD 1-step": ("cd.safetensors", 1, None, "the first CD (250 iterations), 1 step"),
}
# The rule of recipes/README.md ("A booster built to win"), on the shipped 1-step generators.
RULE_GENERATORS = ("ECT 1-step", "CD-long 1-step")
RULE_DROP = 0.10    # FID and KID each fall by at least 10% ...
RULE_JUDGES = 2     # ... beyond 2 paired-bootstrap stds under at least this many panel judges
RULE = ("FID and KID fall by at least 10% and beyond 2 paired-bootstrap stds under at least 2 of the 3 panel "
        "judges, below the tuned unsharp mask's and BIGRoC's FID change under those judges, and no panel judge "
        "sees both rise beyond 2 stds")
SUMMARY_FORMAT = "cmboost.gain-map-summary/1"
SEED = 501          # the map's samples: seeds 501-506, one per generator (the recipe's other seeds are below 500)
VALIDATION_SEED = 601  # the map's tune samples: seeds 601-606


def cached(path: Path, make):
    """np.load(path), or make() saved there first (atomically)."""
    if path.is_file():
        return np.load(path)
    value = np.asarray(make())
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, value)
    tmp.replace(path)
    return value


def samples(out: Path, name: str, checkpoint: str, steps: int, seed: int, num: int, schedule: dict | None = None):
    path = out / "samples" / f"{name.replace(' ', '_')}-{steps}step-seed{seed}-{num}.npz"
    if not path.is_file():
        ts, levels = (schedule or {}).get("ts"), (schedule or {}).get("N")
        sample(SampleRun(model=str(ASSETS / checkpoint), out=str(path), num=num, steps=steps, seed=seed,
                         ts=None if ts is None else tuple(ts), num_levels=levels, batch_size=250, device="cpu",
                         precision="fp32", progress=False, block_size=250))
    return load_samples(path)


def scores(prepared, features: np.ndarray, real_precision: float) -> dict:
    """A generator's own metrics, and its precision deficit against held-out real images' `real_precision`."""
    mu, sigma = feature_statistics(features)
    knn = prepared.knn_metrics(features, 3)
    return {"fid": prepared.fid(mu, sigma, rows=features if len(features) <= features.shape[1] else None),
            "kid": prepared.kid(features)[0], "precision": knn["precision"], "recall": knn["recall"],
            "precision_deficit": real_precision - knn["precision"]}


def change(prepared, base_bootstrap: dict, features: np.ndarray, base: dict) -> dict:
    """The paired change from the unboosted set (its bootstrap, made once per generator and judge) to
    `features`, drawn alike (seed 0): what prepared.paired_bootstrap(base_features, features) gives."""
    paired = paired_change(base_bootstrap, prepared.bootstrap(features, BOOTSTRAP, seed=0))
    return {metric: {"change": paired[metric]["change"], "std": paired[metric]["std"],
                     "relative": paired[metric]["change"] / abs(base[metric]),
                     "relative_std": paired[metric]["std"] / abs(base[metric]),
                     "beyond_noise": abs(paired[metric]["change"]) > 2 * paired[metric]["std"]}
            for metric in ("fid", "kid")}


def tune_answer(out: Path, name: str, checkpoint: str, steps: int, seed: int, model, classifier, tuned: dict,
                train_refs: Path) -> dict:
    """`cmboost tune` (the library function) for this generator: a committee, a small grid, 500 validation samples."""
    path = out / "tune" / f"{name.replace(' ', '_')}.json"
    if path.is_file():
        settings = json.loads(path.read_text())
    else:
        validation = out / "samples" / f"{name.replace(' ', '_')}-val-seed{seed}.npz"
        if not validation.is_file():
            sample(SampleRun(model=str(ASSETS / checkpoint), out=str(validation), num=500, steps=steps, seed=seed,
                             batch_size=250, device="cpu", precision="fp32", progress=False, block_size=250))
        judges = [load_feature_extractor(j, "cpu") for j in COMMITTEE]
        refs = [load_reference(train_refs / f"train-ref-{j}.npz") for j in COMMITTEE]
        grid = [("pgd", {"eps": eps, "steps": PGD_STEPS, "threshold": None}) for eps in (0.5, 1.0, 1.5)]
        grid += [(m, tuned["methods"][m]["hyper"]) for m in ("sgld", "bigroc", "unsharp")]
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = run_tune(ResolvedTune(
            samples=str(validation), out=str(path), model=model, judges=tuple(judges), references=tuple(refs),
            classifier=classifier, grid=tuple(grid), realness_kind=trained_realness_kind(ASSETS / BOOSTER),
            choice=TuneSettings(robust_radius=2.0), progress=False))
    return {"best": settings["best"], "choice": settings["choice"], "reason": settings["decision"]["reason"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num", type=int, default=1000, help="images per generator")
    p.add_argument("--train-refs", help="folder of train-ref-<judge>.npz for the tuning committee (required "
                                        "unless --summary-only)")
    p.add_argument("--out", required=True)
    p.add_argument("--generators", default=",".join(GENERATORS), help="comma-separated, from: " + ", ".join(GENERATORS))
    p.add_argument("--summary-only", action="store_true",
                   help="only rewrite OUT/summary.json (what the demo's report shows) from OUT/map.json")
    p.add_argument("--lever-booster", nargs="+", default=[], metavar="PATH",
                   help="joint networks to add as levers (recipes/README.md): each one's joint PGD at eps "
                        f"{LEVER_RADIUS:g} and the tuned SGLD, beside the shipped booster's")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.summary_only:
        atomic_write_text(out / "summary.json", json.dumps(summary(json.loads((out / "map.json").read_text())),
                                                           indent=1) + "\n")
        return 0
    if not args.train_refs:
        p.error("--train-refs: required to make the map")
    for sub in ("samples", "features", "tune"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    check = load_judge_check()
    tuned = json.loads((ASSETS / TUNED).read_text())
    panel = choose_panel(check, list(COMMITTEE) + [check["attacker"]["name"]])
    extractors = {j: load_feature_extractor(j, "cpu") for j in panel}
    prepared = {j: prepared_statistics(ref, ref.features) for j in panel
                for ref in [load_shipped_reference(j, extractors[j])]}
    model, classifier = load_joint_model(ASSETS / BOOSTER), load_joint_model(ASSETS / CLASSIFIER)
    kind = trained_realness_kind(ASSETS / BOOSTER)
    train, train_labels, _ = load_dataset("fmnist", "train", image_size=32)
    real = train[FMNIST_HELD_OUT_START:FMNIST_HELD_OUT_START + args.num]
    real_labels = train_labels[FMNIST_HELD_OUT_START:FMNIST_HELD_OUT_START + args.num]
    real_features = {j: cached(out / "features" / f"real-{args.num}-{j}.npy",
                               lambda j=j: pool_features(extractors[j], real)) for j in panel}
    real_precision = {j: prepared[j].knn_metrics(real_features[j], 3)["precision"] for j in panel}
    real_d, _ = realness_and_prob(model, to_float(real), torch.as_tensor(real_labels), kind)
    # (label, method, hyperparameters, the network's checkpoint; None: the booster, or BIGRoC's classifier)
    methods = [(f"joint PGD eps {eps:g}", "pgd", {"eps": eps, "steps": PGD_STEPS, "threshold": None,
                                                  "realness_kind": kind}, None) for eps in PGD_RADII]
    methods += [("joint SGLD (tuned)", "sgld", tuned["methods"]["sgld"]["hyper"], None),
                ("BIGRoC (tuned)", "bigroc", tuned["methods"]["bigroc"]["hyper"], None),
                ("unsharp mask (tuned control)", "unsharp", tuned["methods"]["unsharp"]["hyper"], None)]
    lever = {"eps": LEVER_RADIUS, "steps": PGD_STEPS, "threshold": None}
    methods += [(f"old booster joint-w24, PGD eps {LEVER_RADIUS:g}", "pgd",
                 {**lever, "realness_kind": trained_realness_kind(ASSETS / OLD_BOOSTER)}, OLD_BOOSTER)]
    sigmoid_kind = trained_realness_kind(ASSETS / SIGMOID_NET)
    methods += [(f"{SIGMOID_NET.split('.safetensors')[0]} {what}, PGD eps {LEVER_RADIUS:g}", "pgd",
                 {**lever, "objective": objective, "realness_kind": sigmoid_kind}, SIGMOID_NET)
                for what, objective in (("realness only", "realness"), ("joint", "both"))]
    for lever_path in (Path(p).resolve() for p in args.lever_booster):
        methods += [(f"lever {lever_path.parent.name}, PGD eps {LEVER_RADIUS:g}", "pgd",
                     {**lever, "realness_kind": trained_realness_kind(lever_path)}, str(lever_path)),
                    (f"lever {lever_path.parent.name}, SGLD (tuned)", "sgld", tuned["methods"]["sgld"]["hyper"],
                     str(lever_path))]
    networks = {name: load_joint_model(ASSETS / name) for name in {m[3] for m in methods if m[3]}}

    rows = []
    for i, name in enumerate(args.generators.split(",")):
        checkpoint, steps, next_schedule, about = GENERATORS[name]
        tag = name.replace(" ", "_")
        images, labels = samples(out, name, checkpoint, steps, SEED + i, args.num)
        base_features = {j: cached(out / "features" / f"{tag}-none-{j}.npy",
                                   lambda j=j: pool_features(extractors[j], images)) for j in panel}
        base = {j: scores(prepared[j], base_features[j], real_precision[j]) for j in panel}
        base_bootstrap = {j: prepared[j].bootstrap(base_features[j], BOOTSTRAP, seed=0) for j in panel}
        fake_d, _ = realness_and_prob(model, to_float(images), torch.as_tensor(labels), kind)
        row = {"generator": name, "about": about, "checkpoint": checkpoint, "steps": steps, "seed": SEED + i,
               "realness_auc": rank_auc(real_d, fake_d), "base": base, "methods": {}}
        for label, method, hyper, network in methods:
            key = f"{tag}-{method}-" + "-".join(f"{k}{v}" for k, v in sorted(hyper.items()) if k != "realness_kind")
            if network:  # the booster's keys stay as they were
                key += "-" + (Path(network).parent.name if "/" in network else network.split(".safetensors")[0])
            feats, l2 = {}, out / "features" / f"{key}-l2.npy"
            if all((out / "features" / f"{key}-{j}.npy").is_file() for j in panel) and l2.is_file():
                edited = None
            else:
                net = networks[network] if network else model
                edited, norms = run_method(method, hyper, None if method == "bigroc" else net,
                                           classifier if method == "bigroc" else None, images, labels, "cpu")
                np.save(l2, norms)
            for j in panel:
                feats[j] = cached(out / "features" / f"{key}-{j}.npy", lambda j=j: pool_features(extractors[j], edited))
            row["methods"][label] = {"method": method, "hyper": hyper, "network": network or
                                     (CLASSIFIER if method == "bigroc" else BOOSTER),
                                     "mean_l2_change": float(np.load(l2).mean()),
                                     "judges": {j: change(prepared[j], base_bootstrap[j], feats[j], base[j])
                                                for j in panel}}
        more, _ = samples(out, name, checkpoint, steps + 1, SEED + i, args.num, next_schedule)
        route = {j: cached(out / "features" / f"{tag}-route-{j}.npy", lambda j=j: pool_features(extractors[j], more))
                 for j in panel}
        row["methods"][f"one more generator step ({steps + 1} steps)"] = {
            "method": "generator", "hyper": {"steps": steps + 1, **(next_schedule or {})},
            "judges": {j: change(prepared[j], base_bootstrap[j], route[j], base[j]) for j in panel}}
        row["tune"] = tune_answer(out, name, checkpoint, steps, VALIDATION_SEED + i, model, classifier, tuned,
                                  Path(args.train_refs))
        rows.append(row)
        print(f"{name}: AUC {row['realness_auc']:.2f}; tune: {row['tune']['best']}; " + "; ".join(
            f"{j} FID {base[j]['fid']:.1f}" for j in panel), flush=True)

    result = {"format": "cmboost.gain-map/1", "panel": panel, "num": args.num, "booster": BOOSTER,
              "classifier": CLASSIFIER, "tuned_settings_from": TUNED, "pgd_steps": PGD_STEPS, "bootstrap": BOOTSTRAP,
              "reference": "Fashion-MNIST test split (shipped statistics, cmboost/assets/fmnist/ref-test-*.npz)",
              "real": f"held-out training images train[{FMNIST_HELD_OUT_START}:+{args.num}]",
              "tuning_committee": list(COMMITTEE), "rows": rows}
    atomic_write_text(out / "map.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "map.md", render(result))
    atomic_write_text(out / "summary.json", json.dumps(summary(result), indent=1) + "\n")
    plot(result, out / "gain-vs-quality.png")
    print(render(result))
    return 0


def meets_rule(row: dict, label: str, panel: list[str]) -> dict:
    """RULE for one edit on one generator: {"met", "judges_for", "judges_against"}."""
    judged = row["methods"][label]["judges"]
    controls = [name for name in row["methods"] if name.startswith(("unsharp", "BIGRoC"))]

    def falls(j: str) -> bool:
        return all(c["relative"] <= -RULE_DROP and c["beyond_noise"] for c in (judged[j]["fid"], judged[j]["kid"]))

    def beats_controls(j: str) -> bool:
        return all(judged[j]["fid"]["relative"] < row["methods"][c]["judges"][j]["fid"]["relative"] for c in controls)

    def rises(j: str) -> bool:
        return all(c["change"] > 0 and c["beyond_noise"] for c in (judged[j]["fid"], judged[j]["kid"]))

    judges_for = [j for j in panel if falls(j) and beats_controls(j)]
    judges_against = [j for j in panel if rises(j)]
    return {"met": len(judges_for) >= RULE_JUDGES and not judges_against, "judges_for": judges_for,
            "judges_against": judges_against}


def summary(result: dict) -> dict:
    """What the demo's report shows of the map (cmboost/assets/fmnist/gain-map.json): per generator its
    base FID, the booster's AUC, tune's answer, each edit's relative FID and KID change ± std per judge, and
    RULE's verdict for every boosting edit on the shipped 1-step generators."""
    panel = result["panel"]
    generators = []
    for row in result["rows"]:
        edits = {label: {j: [round(m["judges"][j][k][v], 5) for k in ("fid", "kid") for v in ("relative", "relative_std")]
                         for j in panel} for label, m in row["methods"].items()}
        rule = {}
        if row["generator"] in RULE_GENERATORS:
            rule = {label: meets_rule(row, label, panel) for label, m in row["methods"].items()
                    if m["method"] in ("pgd", "sgld")}
        generators.append({"generator": row["generator"], "realness_auc": round(row["realness_auc"], 4),
                           "tune": row["tune"]["best"], "base_fid": {j: round(row["base"][j]["fid"], 3) for j in panel},
                           "edits": edits, "rule": rule})
    return {"format": SUMMARY_FORMAT, "panel": panel, "num": result["num"], "booster": result["booster"],
            "bootstrap": result["bootstrap"], "edit_columns": ["fid_relative", "fid_relative_std", "kid_relative",
                                                              "kid_relative_std"],
            "rule": RULE, "generators": generators}


def render(result: dict) -> str:
    panel = result["panel"]
    lines = [f"{result['num']} images per generator; change of FID against the unboosted images, in %, ± "
             f"paired-bootstrap std ({result['bootstrap']} resamples), * beyond 2 std; reference "
             f"{result['reference']}. Booster {result['booster']} for every generator. Judges: "
             f"{', '.join(panel)} (the validated panel).\n"]
    header = ["generator", "booster AUC", "tune's answer"] + [f"{j}: FID, precision deficit" for j in panel]
    body = [[r["generator"], f"{r['realness_auc']:.2f}", r["tune"]["best"]]
            + [f"{r['base'][j]['fid']:.1f}, {r['base'][j]['precision_deficit']:+.3f}" for j in panel]
            for r in result["rows"]]
    lines.append(markdown_table([dict(zip(header, cells)) for cells in body], header))
    lines.append("")
    header = ["generator", "method"] + [f"{j} FID" for j in panel] + [f"{j} KID" for j in panel]

    def shown(c: dict) -> str:
        return f"{100 * c['relative']:+.1f} ± {100 * c['relative_std']:.1f}{'*' if c['beyond_noise'] else ''}"

    body = [[r["generator"], label] + [shown(m["judges"][j]["fid"]) for j in panel]
            + [shown(m["judges"][j]["kid"]) for j in panel]
            for r in result["rows"] for label, m in r["methods"].items()]
    lines.append(markdown_table([dict(zip(header, cells)) for cells in body], header))
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panel, rows = result["panel"], result["rows"]
    # one series per method; the generator route's label names its step count, which differs by generator
    series = lambda label: label.split(" (")[0] if label.startswith("one more generator step") else label  # noqa: E731
    rows = [dict(r, methods={series(label): m for label, m in r["methods"].items()}) for r in rows]
    labels = list(rows[0]["methods"])
    colours = plt.cm.tab20(np.linspace(0, 1, 20))
    fig, axes = plt.subplots(2, len(panel), figsize=(5 * len(panel), 8), squeeze=False)
    for col, judge in enumerate(panel):
        for row_index, (what, xlabel) in enumerate((("fid", f"generator's FID ({judge})"),
                                                    ("precision_deficit", f"precision deficit vs real ({judge})"))):
            ax = axes[row_index][col]
            for k, label in enumerate(labels):
                xs = [r["base"][judge][what] for r in rows if label in r["methods"]]
                ys = [100 * r["methods"][label]["judges"][judge]["fid"]["relative"] for r in rows if label in r["methods"]]
                es = [100 * r["methods"][label]["judges"][judge]["fid"]["relative_std"] for r in rows
                      if label in r["methods"]]
                ax.errorbar(xs, ys, yerr=es, fmt="o", color=colours[k % 20], label=label, capsize=2, alpha=0.85)
            ax.axhline(0.0, color="grey", linewidth=0.8)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"FID change, % ({judge})")
            ax.set_title(f"judge: {judge}")
    axes[0][0].legend(fontsize=7, loc="best")
    fig.suptitle(f"Where boosting pays: FID change (± paired-bootstrap std) against generator quality, "
                 f"{result['num']} images per generator, booster {result['booster']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
