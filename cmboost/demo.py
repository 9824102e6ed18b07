"""`cmboost demo`: does boosting help, judged by networks that did not choose its settings?

From the shipped Fashion-MNIST checkpoints it samples the CT and CD consistency models, boosts the
samples with the settings `cmboost tune` chose (tuning judge, validation samples, training-split
statistics; cmboost/assets/fmnist/tuned-*.json), and reports against the test split with the
*reporting* judges only (cmboost/metrics/judges.py):
- headline rows (CT and CD 1-step) over several sample seeds, mean +- std of FID and KID;
- two controls per generator: the tuned unsharp mask, and a random edit with the same per-image
  L2 norm as the joint-network PGD edit; the mean L2 change of every method;
- bars: held-out real images, and the same blurred with sigma 1;
- 2-step generators, the four training objectives (the paper's Table 2), and the compute frontier:
  FID against network evaluations per image, generator steps against boosting steps;
- verdicts against the targets, in plain words; larger labelled before/after grids.
Finished rows are cached in rows.json, so an interrupted demo resumes.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from cmboost.atomic import atomic_write_text
from cmboost.boost_job import trained_radius
from cmboost.cm.checkpoint import load_model as load_cm_model
from cmboost.cm.sample import generate_samples
from cmboost.controls import gaussian_blur, l2_change, random_perturbation
from cmboost.data import load_dataset
from cmboost.samples import load_samples, to_float, to_uint8
from cmboost.demo_report import (panel_verdicts, plot_frontier, render_markdown, summarise, summarise_check,
                                  verdicts)
from cmboost.errors import UserInputError
from cmboost.flops import booster_step_flops, generator_step_flops
from cmboost.jobs import first_difference, read_record, write_record
from cmboost.jcd import load_joint_model, read_metadata
from cmboost.metrics.judge_check import attacker_edit, passing
from cmboost.metrics.judges import ATTACKER, JUDGES, REPORTING_JUDGES, describe
from cmboost.report import require_matplotlib, save_labelled_grid
from cmboost.runtime import resolve_device
from cmboost.tune import load_settings_file, run_method, settings_block, tuned_hyper, tuning_judges

ASSETS = Path(__file__).resolve().parent / "assets" / "fmnist"
SETTINGS_FILE = ASSETS / "demo.json"
JUDGE_CHECK_FILE = ASSETS / "judges.json"  # `cmboost check-judges` on the candidates (recipes/fmnist.sh)
REFERENCE_FILE = "ref-test-{judge}.npz"  # the test split's statistics per judge (recipes/fmnist.sh demo-refs)
DIAGNOSE_FILE = "diagnose-{booster}.json"  # `cmboost diagnose` of the booster (recipes/fmnist.sh), in ASSETS
HEADLINE = ("ct1", "cd1")
NAMES = {"ct": "CT", "cd": "CD"}
METRICS = ("fid", "kid", "kid_std", "is", "precision", "recall")
# The tuning judge may prefer almost no sharpening; the classic strength is kept as a second control,
# chosen by no judge, since reporting judges can reward sharpening that the tuning judge does not.
STANDARD_UNSHARP = {"amount": 1.0, "sigma": 1.0}
# Controls that edit each image by the L2 norm of its joint-PGD edit: in a random direction, or along
# the attacker's class evidence (a plain classifier's adversarial edit, PGD with this many steps).
CONTROL_EDITS = ("random", "plain")
PLAIN_CONTROL_STEPS = 10


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    out_dir: str = "demo-out"
    quick: bool = False     # a few dozen images per row: an end-to-end check (the tests)
    full: bool = False      # 1000 images per row; the default is the "standard" size
    device: str | None = "cpu"
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True


def load_settings(path: Path = SETTINGS_FILE) -> dict:
    """The shipped recipe's settings: checkpoints, sample seeds, and the tune files per generator."""
    if not path.is_file():
        raise UserInputError(f"{path}: missing; the demo's checkpoints are made by recipes/fmnist.sh")
    settings = json.loads(path.read_text())
    for name in list(settings["checkpoints"].values()) + list(settings["tuned"].values()):
        if not (ASSETS / name).is_file():
            raise UserInputError(f"{ASSETS / name}: missing shipped file (see recipes/fmnist.sh)")
    return settings


def load_judge_check(path: Path = JUDGE_CHECK_FILE) -> dict:
    """The shipped judge check: which candidate judges passed the ladder and the transfer test."""
    if not path.is_file():
        raise UserInputError(f"{path}: missing; the judge check is made by recipes/fmnist.sh (stage judges-check)")
    try:
        check = json.loads(path.read_text())
        if check.get("format") != "cmboost.judge_check" or not isinstance(check.get("judges"), dict):
            raise ValueError("not a cmboost check-judges report")
    except ValueError as err:
        raise UserInputError(f"{path}: unreadable judge check ({err})") from None
    return check


def read_finished_report(path: Path) -> dict:
    """A finished demo's report.json; a torn or foreign one is one line that says how to recover."""
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError("not a JSON object")
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserInputError(f"{path}: not a readable demo report ({err}); pass --overwrite to run the demo "
                             "again, or delete it") from None
    return saved


def load_diagnostic(booster: str) -> dict | None:
    """The shipped judge-free diagnostic of the boosting network, or None where the recipe made none."""
    path = ASSETS / DIAGNOSE_FILE.format(booster=booster)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise UserInputError(f"{path}: unreadable diagnostic ({err})") from None


def load_shipped_reference(name: str, judge):
    """The recipe's statistics of the whole test split under judge `name` (stage demo-refs), checked
    against the judge's weights."""
    from cmboost.metrics.reference import load_reference

    path = ASSETS / REFERENCE_FILE.format(judge=name)
    if not path.is_file():
        raise UserInputError(f"{path}: missing; it is made by recipes/fmnist.sh stage demo-refs (or run the demo "
                             "with --quick or --full, which compute their own)")
    ref = load_reference(path)
    ref.check_against(judge)
    return ref


def write_shipped_references(judge_names, out_dir: str | os.PathLike = ASSETS, num_features: int = 1000,
                             overwrite: bool = False) -> list[Path]:
    """The statistics the standard demo reads (recipes/fmnist.sh stage demo-refs): for each judge, mu and
    sigma of all 10000 test images padded to 32x32, and the features of `num_features` of them for
    KID and precision/recall, stored compactly."""
    from cmboost.metrics.features import load_feature_extractor
    from cmboost.metrics.reference import reference_stats, save_reference

    test_images, _, _ = load_dataset("fmnist", "test", image_size=32)
    written = []
    for name in judge_names:
        ref = reference_stats(test_images, load_feature_extractor(name, "cpu"), num_features=num_features,
                              source="fmnist test (32x32)")
        written.append(save_reference(Path(out_dir) / REFERENCE_FILE.format(judge=name), ref, overwrite=overwrite,
                                      compact=True))
    return written


def choose_panel(check: dict, excluded: list[str]) -> list[str]:
    """The reporting candidates that passed, less the tuning judge(s) and the attacker."""
    return [name for name in passing(check, excluded) if name in REPORTING_JUDGES]


class Rows:
    """Finished rows, kept on disk after each one so an interrupted demo resumes. Rows saved under
    another configuration (settings, judges, torch version) are dropped, not mixed in."""

    def __init__(self, path: Path, config: dict):
        self.path, self.config = path, config
        saved = read_record(path, f"delete {path} to recompute every row") or {}
        same = first_difference(saved.get("config", {}), config) is None
        self.rows: dict[str, dict] = saved.get("rows", {}) if same else {}

    def get(self, key: str):
        return self.rows.get(key)

    def put(self, key: str, value: dict) -> dict:
        self.rows[key] = value
        write_record(self.path, {"config": self.config, "rows": self.rows})
        return value


def run_demo(options: DemoOptions = DemoOptions()) -> dict:
    """Runs the whole demo and returns the report (also written to out_dir)."""
    from cmboost.metrics.evaluate import evaluate_images
    from cmboost.metrics.domain_net import load_domain_net
    from cmboost.metrics.features import load_feature_extractor
    from cmboost.metrics.reference import reference_stats

    started = time.perf_counter()
    settings = load_settings()
    if options.quick and options.full:
        raise UserInputError("--quick and --full: choose one")
    mode_name = "quick" if options.quick else "full" if options.full else "standard"
    mode = settings[mode_name]
    out = Path(options.out_dir)
    report_path = out / "report.json"
    if options.threads is not None and options.threads < 0:
        raise UserInputError(f"--threads {options.threads}: must be >= 0 (0: torch's choice)")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out-dir {out}: is a file, not a folder")
    if report_path.exists() and not options.overwrite:
        saved = read_finished_report(report_path)
        if saved.get("mode") == mode_name:
            markdown = out / "report.md"
            try:
                print(markdown.read_text())
            except (OSError, UnicodeDecodeError) as err:
                raise UserInputError(f"{markdown}: cannot read the finished demo's report ({err}); pass "
                                     "--overwrite to run the demo again") from None
            print(f"(already done: {report_path}; pass --overwrite to run again)")
            return saved
        raise UserInputError(f"{report_path}: holds a {saved.get('mode')} report; pass --overwrite to replace it")
    require_matplotlib()  # the plot comes last: fail now rather than after the whole run
    out.mkdir(parents=True, exist_ok=True)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    # flushed: a log that is not a terminal still shows each finished row as it comes
    say = (lambda *a, **k: print(*a, **k, flush=True)) if options.progress else (lambda *a, **k: None)

    # The judges: the tuning judge is the one named in the tune files; the report uses only the others.
    tuned = {gen: load_settings_file(ASSETS / name) for gen, name in settings["tuned"].items()}
    tuners = [judge for t in tuned.values() for judge in tuning_judges(t)]  # every committee member
    tuning_ids = {judge["identity"] for judge in tuners}
    tuning_names = sorted({judge["name"] for judge in tuners})
    check = load_judge_check()
    panel = choose_panel(check, tuning_names + [check["attacker"]["name"]])
    if not panel:
        raise UserInputError(f"{JUDGE_CHECK_FILE}: no candidate judge passed the judge check, so no judge can report")
    # The full demo measures every reporting candidate the judge check could run, passed or not, so
    # its rows (cached in rows.json) do not depend on which passed; the report shows the panel only.
    # The quick and standard demos measure the panel alone.
    checked = [n for n in REPORTING_JUDGES if n in check["judges"] and "unavailable" not in check["judges"][n]]
    candidates = checked if options.full else panel
    judges = {}
    for name in candidates:
        try:
            judges[name] = load_feature_extractor(name, device)
        except UserInputError:
            if name in panel:
                raise
    for name in panel:
        if judges[name].identity != check["judges"][name]["identity"]:
            raise UserInputError(f"{JUDGE_CHECK_FILE}: checked {name} with weights {check['judges'][name]['identity']}, "
                                 f"but this installation's {name} is {judges[name].identity}; rerun the judge check")
    lead = panel[0]  # the judge of the progress lines and the frontier plot
    attacker, _ = load_domain_net(check["attacker"]["name"], device)
    overlap = tuning_ids & {j.identity for j in judges.values()}
    if overlap:
        raise UserInputError(f"the tuning judge {overlap} is also a reporting judge; retune with another judge")
    run_config = {"settings": settings, "mode": mode, "torch": torch.__version__,
                   "judges": {n: j.identity for n, j in judges.items()}, "attacker": check["attacker"],
                   "tuned": {g: t["methods"] for g, t in tuned.items()}}
    rows = Rows(out / "rows.json", run_config)

    references = {}

    def reference(name):  # on first use: a resumed demo whose rows are all cached needs none
        if name not in references:
            if mode["reference_images"] == "shipped":
                references[name] = load_shipped_reference(name, judges[name])
            else:
                test_images, _, _ = load_dataset("fmnist", "test", image_size=32)
                references[name] = reference_stats(test_images[: mode["reference_images"]], judges[name],
                                                   source="fmnist test (32x32)")
        return references[name]

    nets = {name: load_joint_model(ASSETS / settings["checkpoints"][name]).to(device)
            for name in settings["checkpoints"] if name.startswith("jcd-")}
    boost_net = settings["booster"]  # the joint network chosen in the recipe (tuning judge, validation)
    samples: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}

    def judge_all(images) -> dict:
        results = {name: evaluate_images(images, reference(name), judge) for name, judge in judges.items()}
        return {name: {k: result[k] for k in METRICS} for name, result in results.items()}

    def generated(gen: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One generator's samples for one seed, drawn once and kept in out_dir/samples/."""
        if (gen, seed) not in samples:
            path = out / "samples" / f"{gen}-seed{seed}.npz"
            if path.is_file():
                samples[gen, seed] = load_samples(path)
            else:
                short, steps = gen[:2], int(gen[2:])
                schedule = settings["schedules"].get(gen) or {}
                generate_samples(ASSETS / settings["checkpoints"][short], path, mode["num_samples"], steps, seed,
                                 schedule.get("ts"), schedule.get("N"), batch_size=250, device=device,
                                 progress=False, block_size=250)  # the blocks the committed report was made with
                samples[gen, seed] = load_samples(path)
        return samples[gen, seed]

    edits: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def boosted(gen: str, seed: int, net: str, method: str, hyper: dict):
        """(edited images, per-image L2 change), computed once: the random control reuses PGD's."""
        key = json.dumps([gen, seed, net, method, hyper], sort_keys=True)
        if key not in edits:
            images, labels = generated(gen, seed)
            model = nets[net] if method not in ("bigroc", "unsharp") else None
            classifier = nets[net] if method == "bigroc" else None
            # the compute block that tune scored this generator's settings with (boost --settings does the same)
            edits[key] = run_method(method, hyper, model, classifier, images, labels, device,
                                    batch_size=settings_block(tuned[gen]))
        return edits[key]

    def measure(gen: str, seed: int, net: str | None = None, method: str | None = None,
                hyper: dict | None = None, grid: str | None = None, label: str | None = None) -> dict:
        """Metrics of one generator's samples, boosted or not, under every reporting judge; cached."""
        key = json.dumps([gen, seed, net, method, hyper], sort_keys=True)
        if rows.get(key) is None:
            t0 = time.perf_counter()
            images, labels = generated(gen, seed)
            change = np.zeros(len(images))
            if method in CONTROL_EDITS:  # the same per-image L2 norm as the joint-network PGD edit
                _, change = boosted(gen, seed, boost_net, "pgd", hyper)
                x = to_float(images).to(device)
                norms = torch.as_tensor(change, dtype=torch.float32)
                if method == "random":
                    edited = to_uint8(random_perturbation(x, norms, seed))
                else:  # raises log p(y|x) under the attacker, a plain classifier that is not the booster
                    y = torch.as_tensor(labels, dtype=torch.long, device=device)
                    edited = to_uint8(attacker_edit(attacker, x, y, norms.to(device), steps=PLAIN_CONTROL_STEPS,
                                                    exact_norm=True))
                change = l2_change(x, to_float(edited).to(device)).cpu().numpy()
            elif method is not None:
                edited, change = boosted(gen, seed, net, method, hyper)
            else:
                edited = images
            if grid:
                save_labelled_grid(images, edited, labels, out / grid, overwrite=True)
            row = rows.put(key, {"judges": judge_all(edited), "mean_l2_change": float(change.mean()),
                                 "seconds": round(time.perf_counter() - t0, 2)})
            what = label or ("none" if method is None else f"{method} ({net})" if net else method)
            say(f"  row {len(rows.rows)}: {gen} seed {seed} {what}: {lead} FID {row['judges'][lead]['fid']:.2f}, "
                f"L2 change {row['mean_l2_change']:.2f} ({row['seconds']:.1f} s)")
        return rows.get(key)

    # Bars: held-out real images (never used to train or tune anything) and the same blurred.
    real, _, _ = load_dataset("fmnist", "train", image_size=32)
    real = real[55000: 55000 + mode["num_samples"]]
    bars = {}
    for name, sigma in (("real (held-out train)", None), ("real, Gaussian blur sigma 1", 1.0)):
        key = json.dumps(["real", sigma], sort_keys=True)
        if rows.get(key) is None:
            images = real if sigma is None else to_uint8(gaussian_blur(to_float(real), sigma))
            rows.put(key, {"judges": judge_all(images), "mean_l2_change": 0.0})
        bars[name] = rows.get(key)
    say(f"  bars ({lead}): " + ", ".join(f"{n}: FID {r['judges'][lead]['fid']:.2f}" for n, r in bars.items()))

    def methods_of(gen: str) -> dict:
        """Table 1's boosting column -> (network, method, hyperparameters), from the generator's tune file."""
        t = tuned[gen]
        _, pgd = tuned_hyper(t, "pgd", gen)
        chosen = {"none": (None, None, None),
                  "unsharp mask, tuned (control)": (None, "unsharp", t["methods"]["unsharp"]["hyper"]),
                  "unsharp mask, amount 1 (control)": (None, "unsharp", STANDARD_UNSHARP),
                  "random, PGD's L2 (control)": (boost_net, "random", pgd),
                  "plain classifier, PGD's L2 (control)": (boost_net, "plain", pgd),
                  "classifier-only (BIGRoC)": ("jcd-ce", "bigroc", tuned_hyper(t, "bigroc", gen)[1]),
                  "joint (PGD)": (boost_net, "pgd", pgd),
                  "joint (SGLD)": (boost_net, "sgld", tuned_hyper(t, "sgld", gen)[1])}
        return chosen

    headline = []  # one row per (generator, seed, method)
    for gen in HEADLINE:
        methods = methods_of(gen)
        for i, seed in enumerate(settings["eval_seeds"][gen][: mode["seeds"]]):
            for booster, (net, method, hyper) in methods.items():
                grid = f"grid-{gen}.png" if (booster == "joint (PGD)" and i == 0) else None
                row = measure(gen, seed, net, method, hyper, grid, label=booster)
                headline.append(dict(generator=f"{NAMES[gen[:2]]} {gen[2:]}-step", gen=gen, seed=seed,
                                     boost=booster, **row))
            say(f"  {gen} seed {seed} ({lead}): " + "  ".join(
                f"{r['boost'].split(' (')[0]} {r['judges'][lead]['fid']:.2f}"
                for r in headline[-len(methods):]))

    two_step = []
    for gen in ("ct2", "cd2"):
        seed = settings["eval_seeds"][gen][0]
        for booster, (net, method, hyper) in methods_of(gen).items():
            if "control" in booster:
                continue
            row = measure(gen, seed, net, method, hyper, label=booster)
            two_step.append(dict(generator=f"{NAMES[gen[:2]]} 2-step", gen=gen, seed=seed, boost=booster, **row))

    # Table 2: the four training objectives (width-16 networks, same data and schedule), each boosting
    # with the same tuned PGD settings and its own reading of realness; a plain classifier has no
    # discriminator, so it ascends log p(y|x).
    objectives = []
    for objective in ("ce", "bce", "ce+bce", "joint"):
        kind = read_metadata(ASSETS / settings["checkpoints"][f"jcd-{objective}"]).get("extra", {}).get(
            "realness_kind", "softmax")
        for gen in HEADLINE:
            hyper = dict(tuned_hyper(tuned[gen], "pgd", gen)[1], realness_kind=kind)
            if objective == "ce":
                hyper.update(objective="log_prob", threshold=None)
            row = measure(gen, settings["eval_seeds"][gen][0], f"jcd-{objective}", "pgd", hyper,
                          label=f"PGD with the {objective} network")
            objectives.append(dict(objective=objective, generator=f"{NAMES[gen[:2]]} 1-step", **row))

    # The compute frontier: network evaluations and operations per image, generator steps against
    # boosting steps (a booster step is a forward and backward pass of a far smaller network).
    flops = {"generator_step": generator_step_flops(load_cm_model(ASSETS / settings["checkpoints"]["ct"])),
             "booster_step": booster_step_flops(nets[boost_net], (1, 32, 32))}
    frontier = {}
    for short in ("ct", "cd"):
        gen = f"{short}1"
        seed = settings["eval_seeds"][gen][0]
        _, pgd = tuned_hyper(tuned[gen], "pgd", gen)
        points = []
        for steps in (1, 2, 3):
            g = f"{short}{steps}"
            row = measure(g, settings["eval_seeds"][g][0])
            points.append({"route": "generator steps", "nfe": steps, **row})
        step_size = pgd["step_size"] or 2.5 * pgd["eps"] / pgd["steps"]
        for k in mode["frontier_boost_steps"] or [pgd["steps"]]:
            # the tuned run, stopped after k steps; all k steps is the headline's boosted set itself
            hyper = pgd if k == pgd["steps"] else dict(pgd, steps=k, step_size=step_size)
            points.append({"route": "1 step + joint PGD", "nfe": 1 + k,
                           **measure(gen, seed, boost_net, "pgd", hyper, label=f"joint PGD stopped after {k} steps")})
        for point in points:
            boost_steps = point["nfe"] - 1 if point["route"] != "generator steps" else 0
            generator_steps = point["nfe"] - boost_steps
            point["gflops"] = (generator_steps * flops["generator_step"] + boost_steps * flops["booster_step"]) / 1e9
        frontier[NAMES[short]] = points
    # The demo owns its figures: a resumed run redraws them (report.json is what --overwrite guards).
    plot = plot_frontier(frontier, lead, out / "fid-vs-nfe.png", overwrite=True)

    def shown(rows_: list[dict]) -> list[dict]:  # the panel's numbers of each row
        return [dict(r, judges={n: r["judges"][n] for n in panel}) for r in rows_]

    headline, two_step, objectives = shown(headline), shown(two_step), shown(objectives)
    bars = {name: shown([r])[0] for name, r in bars.items()}
    frontier = {name: shown(points) for name, points in frontier.items()}
    report = {"mode": mode_name, "num_samples": mode["num_samples"], "seeds": mode["seeds"],
              "reference": "Fashion-MNIST test split, all 10000 images, padded to 32x32 (statistics shipped in "
                           "cmboost/assets/fmnist/, made by recipes/fmnist.sh stage demo-refs)"
                           if mode["reference_images"] == "shipped" else
                           f"Fashion-MNIST test split, first {mode['reference_images']} images, padded to 32x32",
              "flops_per_image": flops,
              "tuning_judge": {"names": tuning_names, "identities": sorted(tuning_ids),
                               "family": "; ".join(describe(n) for n in tuning_names),
                               "how": "cmboost tune on validation samples against training-split statistics"
                                      + (", as a committee: " + tuned[HEADLINE[0]]["rule"]
                                         if "committee" in tuned[HEADLINE[0]] else ""),
                               "agreement": {gen: t["agreement"] for gen, t in tuned.items() if "agreement" in t}},
              "reporting_judges": {n: {"identity": judges[n].identity, "family": JUDGES[n].family} for n in panel},
              "judge_check": summarise_check(check, panel, tuning_names),
              "bars": bars, "headline": headline, "summary": summarise(headline), "two_step": two_step,
              "objectives": objectives, "frontier": frontier, "plot": str(plot),
              "grids": {gen: str(out / f"grid-{gen}.png") for gen in HEADLINE},
              "booster": boost_net, "diagnostic": load_diagnostic(boost_net),
              "booster_radius": trained_radius(ASSETS / settings["checkpoints"][boost_net]),
              "booster_choice": settings["booster_choice"], "generators": settings["generators"],
              "tuned": {g: {m: t["methods"][m]["hyper"] for m in t["methods"]} for g, t in tuned.items()},
              "seconds": round(time.perf_counter() - started, 1)}
    report["verdicts"] = verdicts(report)
    report["panel_verdicts"] = panel_verdicts(report)
    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_text(report_path, json.dumps(report, indent=1))
    say(render_markdown(report))
    return report
