"""`cmboost demo`: the paper's Table 1 and Table 2 on Fashion-MNIST, from the shipped checkpoints.

Samples 1- and 2-step from the shipped CT and CD models, boosts them with the joint network
(PGD, SGLD) and with the classifier-only baseline (BIGRoC on the CE-trained network), and
evaluates FID, IS, precision and recall against the Fashion-MNIST test split with the shipped
domain feature network. Every number is written to report.json and report.md; each finished row
is kept in rows.json, so rerunning after an interruption resumes.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from cmboost.atomic import atomic_write_text
from cmboost.boost import boost
from cmboost.data import load_dataset, load_samples, save_samples, to_float, to_uint8
from cmboost.errors import UserInputError
from cmboost.jcd import load_joint_model, read_metadata
from cmboost.report import line_plot, markdown_table, save_before_after_grid
from cmboost.runtime import resolve_device

ASSETS = Path(__file__).resolve().parent / "assets" / "fmnist"
SETTINGS_FILE = ASSETS / "demo.json"
GENERATORS = (("CT", "ct", 1), ("CT", "ct", 2), ("CD", "cd", 1), ("CD", "cd", 2))
METRICS = ("fid", "is", "precision", "recall")


@dataclasses.dataclass(frozen=True)
class DemoOptions:
    out_dir: str = "demo-out"
    quick: bool = False
    device: str | None = "cpu"
    threads: int | None = None
    overwrite: bool = False
    progress: bool = True


def load_settings(path: Path = SETTINGS_FILE) -> dict:
    """The shipped recipe's settings: checkpoints, sample seeds and the tuned boosting hyperparameters."""
    if not path.is_file():
        raise UserInputError(f"{path}: missing; the demo's checkpoints are made by recipes/fmnist.sh")
    settings = json.loads(path.read_text())
    for name in settings["checkpoints"].values():
        if not (ASSETS / name).is_file():
            raise UserInputError(f"{ASSETS / name}: missing shipped checkpoint (see recipes/fmnist.sh)")
    return settings


class Rows:
    """Finished rows, kept on disk after each one so an interrupted demo resumes."""

    def __init__(self, path: Path, fingerprint: dict):
        self.path, self.fingerprint = path, fingerprint
        self.rows: dict[str, dict] = {}
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved.get("fingerprint") == fingerprint:
                self.rows = saved["rows"]

    def get(self, key: str):
        return self.rows.get(key)

    def put(self, key: str, value: dict) -> dict:
        self.rows[key] = value
        atomic_write_text(self.path, json.dumps({"fingerprint": self.fingerprint, "rows": self.rows}, indent=1))
        return value


def _sample(model_path: Path, steps: int, num: int, seed: int, device, batch_size: int = 250):
    from cmboost.cm.checkpoint import load_model
    from cmboost.cm.sample import choose_sampler, sample_batch

    loaded = load_model(model_path)
    loaded.net.to(device).eval()
    choice = choose_sampler(loaded, steps)
    images, labels = [], []
    for start in range(0, num, batch_size):
        x, y = sample_batch(loaded, choice, range(start, min(start + batch_size, num)), seed, device)
        images.append(to_uint8(x, "signed"))
        labels.append(y.numpy())
    return np.concatenate(images), np.concatenate(labels)


def _boost_u8(model, images, labels, method: str, hyper: dict, device, batch_size: int = 250):
    out = []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size]).to(device)
        y = torch.as_tensor(labels[start:start + batch_size], device=device)
        out.append(to_uint8(boost(model, x, y, method, indices=range(start, start + len(x)), **hyper)))
    return np.concatenate(out)


def run_demo(options: DemoOptions = DemoOptions()) -> dict:
    """Runs the whole demo and returns the report (also written to out_dir)."""
    from cmboost.metrics.evaluate import evaluate_images
    from cmboost.metrics.features import load_feature_extractor
    from cmboost.metrics.reference import reference_stats

    started = time.perf_counter()
    settings = load_settings()
    mode = settings["quick"] if options.quick else settings["full"]
    out = Path(options.out_dir)
    report_path = out / "report.json"
    if report_path.exists() and not options.overwrite:
        saved = json.loads(report_path.read_text())
        if saved.get("mode") == ("quick" if options.quick else "full"):
            print((out / "report.md").read_text())
            print(f"(already done: {report_path}; pass --overwrite to run again)")
            return saved
        raise UserInputError(f"{report_path}: holds a {saved.get('mode')} report; pass --overwrite to replace it")
    out.mkdir(parents=True, exist_ok=True)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = resolve_device(options.device)
    say = print if options.progress else (lambda *a, **k: None)
    fingerprint = {"settings": settings, "mode": mode, "torch": torch.__version__}
    rows = Rows(out / "rows.json", fingerprint)

    extractor = load_feature_extractor("fmnist", device)
    test_images, _, _ = load_dataset("fmnist", "test", image_size=32)
    reference = reference_stats(test_images[: mode["reference_images"]], extractor, source="fmnist test (32x32)")
    nets = {name: load_joint_model(ASSETS / settings["checkpoints"][name]).to(device)
            for name in ("jcd-joint", "jcd-ce", "jcd-bce", "jcd-ce+bce")}
    samples: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def evaluate(images) -> dict:
        result = evaluate_images(images, reference, extractor)
        return {key: float(result[key]) for key in METRICS}

    def generated(short: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
        """The evaluation samples of one generator, drawn once and kept in out_dir/samples/."""
        key = f"{short}{steps}"
        if key not in samples:
            path = out / "samples" / f"{key}.npz"
            if path.is_file():
                samples[key] = load_samples(path)
            else:
                samples[key] = _sample(ASSETS / settings["checkpoints"][short], steps, mode["num_samples"],
                                       settings["eval_seeds"][key], device)
                save_samples(path, *samples[key])
        return samples[key]

    def measure(short: str, steps: int, net: str | None = None, method: str | None = None,
                hyper: dict | None = None, grid: bool = False) -> dict:
        """Metrics of one generator's samples, boosted or not; cached by what determines them."""
        hyper = dict(hyper or {})
        if method == "pgd" and hyper.get("step_size") is None:
            hyper["step_size"] = 2.5 * hyper["eps"] / hyper["steps"]  # boost.PGDBoost's default, made explicit
        if net is None or hyper.get("steps") == 0:
            net, method, hyper = None, None, {}
        key = json.dumps([f"{short}{steps}", net, method, hyper], sort_keys=True)
        if rows.get(key) is None:
            t0 = time.perf_counter()
            images, labels = generated(short, steps)
            boosted = images if net is None else _boost_u8(nets[net], images, labels, method, hyper, device)
            if grid:
                save_before_after_grid(images, boosted, out / f"grid-{short}{steps}.png")
            rows.put(key, dict(evaluate(boosted), seconds=round(time.perf_counter() - t0, 2)))
        return rows.get(key)

    boost_settings = settings["boost"]
    boosters = {  # Table 1's boosting column -> (network, method, hyperparameters)
        "none": (None, None, None),
        "classifier-only (BIGRoC)": ("jcd-ce", "bigroc", boost_settings["bigroc"]),
        "joint (PGD)": ("jcd-joint", "pgd", boost_settings["pgd"]),
        "joint (SGLD)": ("jcd-joint", "sgld", boost_settings["sgld"]),
    }
    table1, grids = [], {}
    for name, short, steps in GENERATORS:
        for booster, (net, method, hyper) in boosters.items():
            metrics = measure(short, steps, net, method, hyper, grid=booster == "joint (PGD)")
            table1.append(dict(generator=name, steps=steps, boost=booster, **metrics))
            say(f"  {name} {steps}-step  {booster:26s} FID {metrics['fid']:7.3f}  IS {metrics['is']:5.2f}  "
                f"P {metrics['precision']:.3f}  R {metrics['recall']:.3f}")
        grids[f"{short}{steps}"] = str(out / f"grid-{short}{steps}.png")

    # Table 2: the four training objectives, each boosting with PGD and its own reading of realness.
    table2 = []
    for objective in ("ce", "bce", "ce+bce", "joint"):
        path = ASSETS / settings["checkpoints"][f"jcd-{objective}"]
        kind = read_metadata(path).get("extra", {}).get("realness_kind", "softmax")
        hyper = dict(boost_settings["pgd"], realness_kind=kind)
        if objective == "ce":  # a classifier has no discriminator: its score is log p(y|x)
            hyper.update(objective="log_prob", threshold=None)
        row = {"objective": objective}
        for short in ("ct", "cd"):
            metrics = measure(short, 1, f"jcd-{objective}", "pgd", hyper)
            row.update({f"{short.upper()} 1-step FID": metrics["fid"], f"{short.upper()} 1-step IS": metrics["is"]})
        table2.append(row)

    # FID against the number of joint-network PGD steps, the step size fixed at its tuned value.
    curve = {}
    pgd = boost_settings["pgd"]
    step_size = pgd.get("step_size") or 2.5 * pgd["eps"] / pgd["steps"]
    for short in ("ct", "cd"):
        curve[f"{short.upper()} 1-step"] = [
            (steps, measure(short, 1, "jcd-joint", "pgd", dict(pgd, steps=steps, step_size=step_size))["fid"])
            for steps in mode["curve_steps"]]
    plot = line_plot(curve, out / "fid-vs-steps.png", "FID vs joint-network PGD steps", "boosting steps", "FID")

    report = {"mode": "quick" if options.quick else "full", "num_samples": mode["num_samples"],
              "reference": f"Fashion-MNIST test split, first {mode['reference_images']} images, padded to 32x32",
              "features": "shipped domain network (cmboost/assets/fmnist_features.safetensors)",
              "table1": table1, "table2": table2, "fid_vs_steps": curve, "boost": settings["boost"],
              "grids": grids, "plot": str(plot), "seconds": round(time.perf_counter() - started, 1)}
    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_text(report_path, json.dumps(report, indent=1))
    say(render_markdown(report))
    return report


def render_markdown(report: dict) -> str:
    t1 = markdown_table(report["table1"], ["generator", "steps", "boost", "fid", "is", "precision", "recall"])
    columns = ["objective", "CT 1-step FID", "CT 1-step IS", "CD 1-step FID", "CD 1-step IS"]
    t2 = markdown_table(report["table2"], columns)
    curve = "\n".join(f"- {name}: " + ", ".join(f"{s} steps {f:.2f}" for s, f in pts)
                      for name, pts in report["fid_vs_steps"].items())
    return (f"# cmboost demo: Fashion-MNIST ({report['mode']}, {report['num_samples']} samples per row)\n\n"
            f"Reference: {report['reference']}. Features: {report['features']}.\n\n"
            f"## Table 1: boosting consistency-model samples\n\n{t1}\n\n"
            f"## Table 2: training objective of the joint network (PGD boosting)\n\n{t2}\n\n"
            f"## FID against boosting steps (joint network, PGD)\n\n{curve}\n\n![FID vs steps](fid-vs-steps.png)\n\n"
            f"Boosting settings: `{json.dumps(report['boost'])}`\n\nRan in {report['seconds']} s.\n")
