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
The rows, methods and controls are tables (METHODS) that the run walks. The out_dir is a
`jobs.Job`: finished rows are cached there, so an interrupted demo resumes.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from cmboost.boosting.apply import run_method
from cmboost.boosting.boost import trained_radius
from cmboost.boosting.config import PGDBoost, make_hyper
from cmboost.boosting.controls import gaussian_blur, l2_change, random_perturbation
from cmboost.boosting.settings import load_settings_file, settings_block, tuned_hyper, tuning_judges
from cmboost.cm.checkpoint import load_model as load_cm_model
from cmboost.cm.sample import SampleRun, sample
from cmboost.demo.assets import (ASSETS, JUDGE_CHECK_FILE, load_diagnostic, load_gain_map, load_judge_check,
                                 load_settings, load_shipped_reference, read_finished_report)
from cmboost.demo.flops import booster_step_flops, generator_step_flops
from cmboost.demo.plan import (CONTROL_EDITS, FRONTIER_STEPS, HEADLINE, METHODS, METRICS, NAMES, OBJECTIVE_NETWORKS,
                               PAIRED_RESAMPLES, PLAIN_CONTROL_STEPS, STANDARD_UNSHARP, DemoOptions, Method,
                               choose_panel, demo_row_problem, tune_answer)
from cmboost.demo.report import plot_frontier, render_markdown
from cmboost.demo.verdicts import paired_changes, panel_verdicts, summarise, summarise_check, verdicts
from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_write_text
from cmboost.files.datasets import FMNIST_HELD_OUT_START, load_dataset
from cmboost.files.report import require_matplotlib, save_labelled_grid
from cmboost.files.samples import load_samples, to_float, to_uint8
from cmboost.jcd.model import load_joint_model, read_metadata
from cmboost.jobs.job import Job
from cmboost.metrics.domain_net import load_domain_net
from cmboost.metrics.evaluate import evaluate_images
from cmboost.metrics.features import load_feature_extractor
from cmboost.metrics.judge_check import attacker_edit
from cmboost.metrics.judges import JUDGES, REPORTING_JUDGES, describe
from cmboost.metrics.reference import reference_stats
from cmboost.records import field_default
from cmboost.runtime import resolve_device


def _finished(options: DemoOptions, report_path: Path) -> dict | None:
    """The finished report of this mode (printed again), None when there is none or --overwrite asks
    for a new run; a report of another mode is refused."""
    if not report_path.exists() or options.overwrite:
        return None
    saved = read_finished_report(report_path)
    if saved.get("mode") != options.mode:
        raise UserInputError(f"{report_path}: holds a {saved.get('mode')} report; pass --overwrite to replace it")
    markdown = report_path.with_name("report.md")
    try:
        print(markdown.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise UserInputError(f"{markdown}: cannot read the finished demo's report ({err}); pass "
                             "--overwrite to run the demo again") from None
    print(f"(already done: {report_path}; pass --overwrite to run again)")
    return saved


def run_demo(options: DemoOptions = DemoOptions()) -> dict:
    """Runs the whole demo and returns the report (also written to out_dir). The out_dir is a
    `jobs.Job`: each finished row is cached there, so an interrupted demo resumes."""

    started = time.perf_counter()
    settings = load_settings()
    out = Path(options.out_dir)
    report_path = out / "report.json"
    if out.exists() and not out.is_dir():
        raise UserInputError(f"--out-dir {out}: is a file, not a folder")
    finished = _finished(options, report_path)
    if finished is not None:
        return finished
    require_matplotlib()  # the plot comes last: fail now rather than after the whole run
    if options.threads:
        torch.set_num_threads(options.threads)
    demo = _Demo(settings, options, resolve_device(options.device))
    with Job(out, demo.config(), name=f"--out-dir {out}", fresh="pass --overwrite to start over",
             restart=options.overwrite, row_problem=demo_row_problem) as job:
        if not job.resumed:  # samples drawn under another configuration are not this run's
            shutil.rmtree(out / "samples", ignore_errors=True)
        report = demo.run(job, out, started)
    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_text(report_path, json.dumps(report, indent=1))
    demo.say(render_markdown(report))
    return report


class _Demo:
    """One demo run: its judges, networks and tuned settings, and the rows it measures."""

    def __init__(self, settings: dict, options: DemoOptions, device: torch.device):
        self.settings, self.options, self.device = settings, options, device
        self.mode = settings[options.mode]
        # flushed: a log that is not a terminal still shows each finished row as it comes
        self.say = (lambda *a, **k: print(*a, **k, flush=True)) if options.progress else (lambda *a, **k: None)
        # The judges: the tuning judges are the ones named in the tune files; the report uses only others.
        self.tuned = {gen: load_settings_file(ASSETS / name) for gen, name in settings["tuned"].items()}
        tuners = [judge for t in self.tuned.values() for judge in tuning_judges(t)]  # every committee member
        self.tuning_ids = {judge["identity"] for judge in tuners}
        self.tuning_names = sorted({judge["name"] for judge in tuners})
        self.check = check = load_judge_check()
        self.panel = panel = choose_panel(check, self.tuning_names + [check["attacker"]["name"]])
        if not panel:
            raise UserInputError(f"{JUDGE_CHECK_FILE}: no candidate judge passed the judge check, so no judge can report")
        # The full demo measures every reporting candidate the judge check could run, passed or not, so
        # its cached rows do not depend on which passed; the report shows the panel only. The quick and
        # standard demos measure the panel alone.
        checked = [n for n in REPORTING_JUDGES if n in check["judges"] and "unavailable" not in check["judges"][n]]
        self.judges = {}
        for name in checked if options.full else panel:
            try:
                self.judges[name] = load_feature_extractor(name, device)
            except UserInputError:
                if name in panel:
                    raise
        for name in panel:
            if self.judges[name].identity != check["judges"][name]["identity"]:
                raise UserInputError(f"{JUDGE_CHECK_FILE}: checked {name} with weights "
                                     f"{check['judges'][name]['identity']}, but this installation's {name} is "
                                     f"{self.judges[name].identity}; rerun the judge check")
        self.lead = panel[0]  # the judge of the progress lines and the frontier plot
        self.attacker, _ = load_domain_net(check["attacker"]["name"], device)
        overlap = self.tuning_ids & {j.identity for j in self.judges.values()}
        if overlap:
            raise UserInputError(f"the tuning judge {overlap} is also a reporting judge; retune with another judge")
        self.nets = {name: load_joint_model(ASSETS / settings["checkpoints"][name]).to(device)
                     for name in settings["checkpoints"] if name.startswith("jcd-")}
        self.booster = settings["booster"]  # the joint network chosen in the recipe (tuning judge, validation)
        self.references: dict = {}
        self.samples: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
        self.edits: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def config(self) -> dict:
        """What every cached row depends on."""
        return {"settings": self.settings, "mode": self.mode, "torch": torch.__version__,
                "paired_resamples": PAIRED_RESAMPLES,
                "judges": {n: j.identity for n, j in self.judges.items()}, "attacker": self.check["attacker"],
                "tuned": {g: t["methods"] for g, t in self.tuned.items()}}

    # -- inputs
    def reference(self, name: str):
        """A judge's test-split statistics, on first use: a resumed demo whose rows are all cached needs none."""

        if name not in self.references:
            if self.mode["reference_images"] == "shipped":
                self.references[name] = load_shipped_reference(name, self.judges[name])
            else:
                test_images, _, _ = load_dataset("fmnist", "test", image_size=32)
                self.references[name] = reference_stats(test_images[: self.mode["reference_images"]],
                                                        self.judges[name], source="fmnist test (32x32)")
        return self.references[name]

    def generated(self, gen: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """One generator's samples for one seed, drawn once and kept in out_dir/samples/."""
        if (gen, seed) not in self.samples:
            path = self.out / "samples" / f"{gen}-seed{seed}.npz"
            if not path.is_file():
                short, steps = gen[:2], int(gen[2:])
                schedule = self.settings["schedules"].get(gen) or {}
                ts = schedule.get("ts")
                sample(SampleRun(model=str(ASSETS / self.settings["checkpoints"][short]), out=str(path),
                                 num=self.mode["num_samples"], steps=steps, seed=seed,
                                 ts=None if ts is None else tuple(ts), num_levels=schedule.get("N"), batch_size=250,
                                 device=str(self.device), precision="fp32", progress=False,
                                 block_size=250))  # the blocks the committed report was made with
            self.samples[gen, seed] = load_samples(path)
        return self.samples[gen, seed]

    def network(self, name: str | None) -> str | None:
        return self.booster if name == "booster" else name

    def hyper(self, m: Method, gen: str) -> dict | None:
        if m.hyper == "tuned":
            return tuned_hyper(self.tuned[gen], m.tuned_as, gen)[1]
        if m.hyper == "tuned control":  # a control the tune file scored alongside the methods
            return self.tuned[gen]["methods"][m.tuned_as]["hyper"]
        if m.hyper == "standard":
            return STANDARD_UNSHARP
        return None

    # -- rows
    def boosted(self, gen: str, seed: int, net: str, method: str, hyper: dict):
        """(edited images, per-image L2 change), computed once: the edit controls reuse PGD's."""
        key = json.dumps([gen, seed, net, method, hyper], sort_keys=True)
        if key not in self.edits:
            images, labels = self.generated(gen, seed)
            model = self.nets[net] if method not in ("bigroc", "unsharp") else None
            classifier = self.nets[net] if method == "bigroc" else None
            # the compute block that tune scored this generator's settings with (boost --settings does the same)
            self.edits[key] = run_method(method, hyper, model, classifier, images, labels, self.device,
                                         batch_size=settings_block(self.tuned[gen]))
        return self.edits[key]

    def edited(self, gen: str, seed: int, net: str | None, method: str | None, hyper: dict | None):
        """(images, labels, edited images, per-image L2 change) of one row."""
        images, labels = self.generated(gen, seed)
        if method is None:
            return images, labels, images, np.zeros(len(images))
        if method not in CONTROL_EDITS:
            return (images, labels, *self.boosted(gen, seed, net, method, hyper))
        # the same per-image L2 norm as the joint-network PGD edit
        _, change = self.boosted(gen, seed, self.booster, "pgd", hyper)
        x = to_float(images).to(self.device)
        norms = torch.as_tensor(change, dtype=torch.float32)
        if method == "random":
            edited = to_uint8(random_perturbation(x, norms, seed))
        else:  # raises log p(y|x) under the attacker, a plain classifier that is not the booster
            y = torch.as_tensor(labels, dtype=torch.long, device=self.device)
            edited = to_uint8(attacker_edit(self.attacker, x, y, norms.to(self.device), steps=PLAIN_CONTROL_STEPS,
                                            exact_norm=True))
        return images, labels, edited, l2_change(x, to_float(edited).to(self.device)).cpu().numpy()

    def judge_all(self, images, bootstrap: int = 0) -> dict:
        """Every judge's METRICS of the images, and with `bootstrap` > 0 their resampled FID and KID."""

        results = {name: evaluate_images(images, self.reference(name), judge, bootstrap=bootstrap)
                   for name, judge in self.judges.items()}
        return {name: {k: result[k] for k in METRICS + (("bootstrap",) if bootstrap else ())}
                for name, result in results.items()}

    def measure(self, gen: str, seed: int, net: str | None = None, method: str | None = None,
                hyper: dict | None = None, grid: str | None = None, label: str = "none", paired: bool = False) -> dict:
        """Metrics of one generator's samples, boosted or not, under every reporting judge; cached.
        `paired`: the row also keeps each judge's bootstrap (PAIRED_RESAMPLES), for the paired verdict."""
        key = json.dumps([gen, seed, net, method, hyper], sort_keys=True)
        cached = self.job.row(key)
        if cached is None or (paired and any("bootstrap" not in j for j in cached["judges"].values())):
            t0 = time.perf_counter()
            images, labels, edited, change = self.edited(gen, seed, net, method, hyper)
            if grid:
                save_labelled_grid(images, edited, labels, self.out / grid, overwrite=True)
            row = self.job.put_row(key, {"judges": self.judge_all(edited, PAIRED_RESAMPLES if paired else 0),
                                         "mean_l2_change": float(change.mean()),
                                         "seconds": round(time.perf_counter() - t0, 2)})
            self.say(f"  row {len(self.job.rows)}: {gen} seed {seed} {label}: {self.lead} FID "
                     f"{row['judges'][self.lead]['fid']:.2f}, L2 change {row['mean_l2_change']:.2f} "
                     f"({row['seconds']:.1f} s)")
        return self.job.row(key)

    def measure_method(self, m: Method, gen: str, seed: int, grid: str | None = None, paired: bool = False) -> dict:
        return self.measure(gen, seed, self.network(m.network), m.method, self.hyper(m, gen), grid, label=m.label,
                            paired=paired)

    # -- sections of the report
    def bars(self) -> dict:
        """Held-out real images (never used to train or tune anything) and the same blurred."""
        real, _, _ = load_dataset("fmnist", "train", image_size=32)
        real = real[FMNIST_HELD_OUT_START: FMNIST_HELD_OUT_START + self.mode["num_samples"]]
        bars = {}
        for name, sigma in (("real (held-out train)", None), ("real, Gaussian blur sigma 1", 1.0)):
            key = json.dumps(["real", sigma], sort_keys=True)
            if self.job.row(key) is None:
                images = real if sigma is None else to_uint8(gaussian_blur(to_float(real), sigma))
                self.job.put_row(key, {"judges": self.judge_all(images), "mean_l2_change": 0.0})
            bars[name] = self.job.row(key)
        self.say(f"  bars ({self.lead}): " + ", ".join(f"{n}: FID {r['judges'][self.lead]['fid']:.2f}"
                                                        for n, r in bars.items()))
        return bars

    def headline(self) -> list[dict]:
        rows = []  # one per (generator, seed, method)
        for gen in HEADLINE:
            for i, seed in enumerate(self.settings["eval_seeds"][gen][: self.mode["seeds"]]):
                for m in METHODS:
                    grid = f"grid-{gen}.png" if (m.grid and i == 0) else None
                    rows.append(dict(generator=f"{NAMES[gen[:2]]} {gen[2:]}-step", gen=gen, seed=seed, boost=m.label,
                                     key=m.key,
                                     **self.measure_method(m, gen, seed, grid, paired=m.paired)))
                self.say(f"  {gen} seed {seed} ({self.lead}): " + "  ".join(
                    f"{r['boost'].split(' (')[0]} {r['judges'][self.lead]['fid']:.2f}" for r in rows[-len(METHODS):]))
        return rows

    def two_step(self) -> list[dict]:
        rows = []
        for gen in ("ct2", "cd2"):
            seed = self.settings["eval_seeds"][gen][0]
            for m in METHODS:
                if not m.control:
                    rows.append(dict(generator=f"{NAMES[gen[:2]]} 2-step", gen=gen, seed=seed, boost=m.label, key=m.key,
                                     **self.measure_method(m, gen, seed)))
        return rows

    def objectives(self) -> list[dict]:
        """Table 2: the four training objectives (width-16 networks, same data and schedule), each
        boosting with the same tuned PGD settings and its own reading of realness; a plain classifier
        has no discriminator, so it ascends log p(y|x)."""
        rows = []
        for objective in OBJECTIVE_NETWORKS:
            net = f"jcd-{objective}"
            kind = read_metadata(ASSETS / self.settings["checkpoints"][net]).get("extra", {}).get(
                "realness_kind", field_default(PGDBoost, "realness_kind"))
            for gen in HEADLINE:
                hyper = dict(tuned_hyper(self.tuned[gen], "pgd", gen)[1], realness_kind=kind)
                if objective == "ce":
                    hyper.update(objective="log_prob", threshold=None)
                row = self.measure(gen, self.settings["eval_seeds"][gen][0], net, "pgd", hyper,
                                   label=f"PGD with the {objective} network")
                rows.append(dict(objective=objective, generator=f"{NAMES[gen[:2]]} 1-step", **row))
        return rows

    def frontier(self, flops: dict) -> dict:
        """Network evaluations and operations per image, generator steps against boosting steps (a
        booster step is a forward and backward pass of a far smaller network)."""
        frontier = {}
        for short in ("ct", "cd"):
            gen = f"{short}1"
            seed = self.settings["eval_seeds"][gen][0]
            _, pgd = tuned_hyper(self.tuned[gen], "pgd", gen)
            points = [{"route": "generator steps", "nfe": steps,
                       **self.measure(f"{short}{steps}", self.settings["eval_seeds"][f"{short}{steps}"][0])}
                      for steps in FRONTIER_STEPS]
            for k in self.mode["frontier_boost_steps"] or [pgd["steps"]]:
                # the tuned run, stopped after k steps; all k steps is the headline's boosted set itself
                hyper = pgd if k == pgd["steps"] else dict(pgd, steps=k, step_size=make_hyper("pgd", **pgd).step)
                points.append({"route": "1 step + joint PGD", "nfe": 1 + k,
                               **self.measure(gen, seed, self.booster, "pgd", hyper,
                                              label=f"joint PGD stopped after {k} steps")})
            for point in points:
                boost_steps = point["nfe"] - 1 if point["route"] != "generator steps" else 0
                generator_steps = point["nfe"] - boost_steps
                point["gflops"] = (generator_steps * flops["generator_step"] + boost_steps * flops["booster_step"]) / 1e9
            frontier[NAMES[short]] = points
        return frontier

    def run(self, job: Job, out: Path, started: float) -> dict:
        self.job, self.out = job, out
        bars, headline, two_step, objectives = self.bars(), self.headline(), self.two_step(), self.objectives()
        flops = {"generator_step": generator_step_flops(load_cm_model(ASSETS / self.settings["checkpoints"]["ct"])),
                 "booster_step": booster_step_flops(self.nets[self.booster], (1, 32, 32))}
        frontier = self.frontier(flops)
        # The demo owns its figures: a resumed run redraws them (report.json is what --overwrite guards).
        plot = plot_frontier(frontier, self.lead, out / "fid-vs-nfe.png", overwrite=True)
        return self.report(bars, headline, two_step, objectives, frontier, flops, plot, started)

    def report(self, bars, headline, two_step, objectives, frontier, flops, plot, started) -> dict:
        panel, settings, tuned, mode = self.panel, self.settings, self.tuned, self.mode

        def shown(rows_: list[dict]) -> list[dict]:  # the panel's numbers of each row, without the resamples
            return [dict(r, judges={n: {k: v for k, v in r["judges"][n].items() if k != "bootstrap"} for n in panel})
                    for r in rows_]

        paired = paired_changes(headline, panel)  # reads the resamples, which the report does not keep
        headline, two_step, objectives = shown(headline), shown(two_step), shown(objectives)
        bars = {name: shown([r])[0] for name, r in bars.items()}
        frontier = {name: shown(points) for name, points in frontier.items()}
        report = {"mode": self.options.mode, "num_samples": mode["num_samples"], "seeds": mode["seeds"],
                  "reference": "Fashion-MNIST test split, all 10000 images, padded to 32x32 (statistics shipped in "
                               "cmboost/assets/fmnist/, made by recipes/fmnist.sh stage demo-refs)"
                               if mode["reference_images"] == "shipped" else
                               f"Fashion-MNIST test split, first {mode['reference_images']} images, padded to 32x32",
                  "flops_per_image": flops,
                  "tuning_judge": {"names": self.tuning_names, "identities": sorted(self.tuning_ids),
                                   "family": "; ".join(describe(n) for n in self.tuning_names),
                                   "how": "cmboost tune on validation samples against training-split statistics"
                                          + (", as a committee: " + tuned[HEADLINE[0]]["rule"]
                                             if "committee" in tuned[HEADLINE[0]] else ""),
                                   "agreement": {gen: t["agreement"] for gen, t in tuned.items() if "agreement" in t}},
                  "reporting_judges": {n: {"identity": self.judges[n].identity, "family": JUDGES[n].family}
                                       for n in panel},
                  "judge_check": summarise_check(self.check, panel, self.tuning_names),
                  "bars": bars, "headline": headline, "summary": summarise(headline), "two_step": two_step,
                  "objectives": objectives, "frontier": frontier, "plot": str(plot),
                  "grids": {gen: str(self.out / f"grid-{gen}.png") for gen in HEADLINE},
                  "booster": self.booster, "diagnostic": load_diagnostic(self.booster),
                  "gain_map": load_gain_map(),
                  "booster_radius": trained_radius(ASSETS / settings["checkpoints"][self.booster]),
                  "booster_choice": settings["booster_choice"], "generators": settings["generators"],
                  "tuned": {g: {m: t["methods"][m]["hyper"] for m in t["methods"]} for g, t in tuned.items()},
                  "answers": {f"{NAMES[g[:2]]} {g[2:]}-step": tune_answer(t) for g, t in tuned.items()},
                  "paired": paired, "paired_resamples": PAIRED_RESAMPLES,
                  "seconds": round(time.perf_counter() - started, 1)}
        report["verdicts"] = verdicts(report)
        report["panel_verdicts"] = panel_verdicts(report)
        return report
