"""Judges validated before they judge: a degradation ladder and an adversarial-transfer test.

A feature network's FID is evidence about image quality only if the network sees quality. Two tests,
both against a reference of real test images, decide whether a candidate judge may report:

- **the degradation ladder.** Real images that the reference does not hold are damaged step by step
  (Gaussian blur, Gaussian noise, JPEG compression, and a growing share of generated images). A judge
  that sees quality ranks every ladder monotonically: FID(clean) < FID(step 1) < FID(step 2) < FID(step 3).
- **the adversarial-transfer test.** Generated images are moved by small L2 PGD edits (eps 1-3) that raise
  log p(y|x) under a plainly trained classifier, the *attacker*, unrelated to the judge and to the booster,
  beside a random edit of the same per-image norm. Such edits are not perceptual improvements. A judge
  whose FID falls by more than its error bar (twice the std of the paired bootstrap of the FID change)
  reads adversarial directions, and its verdict on boosting (also a gradient edit) is no evidence.

A judge passes when it ranks every ladder monotonically and rewards no transfer edit. The steps are
pure functions: images -> features -> numbers -> verdict.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import os
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cmboost.boosting.config import step_length
from cmboost.boosting.controls import gaussian_blur, move_to_norm, random_perturbation
from cmboost.errors import UserInputError
from cmboost.jobs.job import Job
from cmboost.metrics.domain_net import load_domain_net
from cmboost.metrics.features import load_feature_extractor
from cmboost.metrics.prepared import ReferenceStatistics
from cmboost.metrics.stats import feature_statistics
from cmboost.runtime import in_cpu_chunks, randn_per_sample, sample_generators

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class CheckSettings:
    """How a judge is checked; every default is stated here once."""
    blur_sigmas: tuple[float, ...] = (0.5, 1.0, 1.5)
    noise_stds: tuple[float, ...] = (0.05, 0.1, 0.2)
    jpeg_qualities: tuple[int, ...] = (75, 35, 10)
    mix_fractions: tuple[float, ...] = (0.25, 0.5, 0.75)
    transfer_eps: tuple[float, ...] = (1.0, 2.0, 3.0)
    transfer_steps: int = 10
    bootstrap: int = 20           # paired bootstrap resamples for the transfer test's error bar
    error_bars: float = 2.0       # a gain beyond this many bootstrap stds is a reward
    seed: int = 0

    def __post_init__(self):
        if self.transfer_steps < 1 or self.bootstrap < 2 or not self.error_bars > 0:
            raise UserInputError(f"judge check settings: transfer_steps >= 1, bootstrap >= 2 and error_bars > 0 "
                                 f"(got {self.transfer_steps}, {self.bootstrap}, {self.error_bars})")


# ----------------------------------------------------------------------------- the damaged images


def jpeg(images_u8: np.ndarray, quality: int) -> np.ndarray:
    """Each image through a real baseline JPEG encoder and decoder (PIL, libjpeg) at `quality`."""
    from PIL import Image

    out = np.empty_like(images_u8)
    for i, image in enumerate(images_u8):
        mode = "L" if image.shape[0] == 1 else "RGB"
        pil = Image.fromarray(image[0] if mode == "L" else image.transpose(1, 2, 0), mode)
        buffer = io.BytesIO()
        pil.save(buffer, format="JPEG", quality=int(quality))
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert(mode))
        out[i] = decoded[None] if mode == "L" else decoded.transpose(2, 0, 1)
    return out


def _to_float(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).float() / 255.0


def _to_u8(images: torch.Tensor) -> np.ndarray:
    return (images.clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()


def gaussian_noise(images_u8: np.ndarray, std: float, seed: int) -> np.ndarray:
    """Per-image noise streams (seed, index), so the result does not depend on batching."""
    x = _to_float(images_u8)
    noise = randn_per_sample(sample_generators(seed, range(len(x))), x.shape[1:], x.device)
    return _to_u8(x + std * noise)


def mix(real_u8: np.ndarray, generated_u8: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """`real_u8` with a random `fraction` of its images replaced by generated ones (same count)."""
    count = int(round(fraction * len(real_u8)))
    if count > len(generated_u8):
        raise UserInputError(f"mixing {fraction:.0%} generated images needs {count} of them; "
                             f"only {len(generated_u8)} were given")
    rng = np.random.default_rng(seed)
    out = real_u8.copy()
    out[rng.choice(len(real_u8), count, replace=False)] = generated_u8[rng.choice(len(generated_u8), count, replace=False)]
    return out


def ladders(real_u8: np.ndarray, generated_u8: np.ndarray, settings: CheckSettings) -> dict[str, list]:
    """{family: [(label, images), ...]} from mild to severe; every family starts after the clean images."""
    x = _to_float(real_u8)
    return {
        "blur": [(f"blur sigma {s}", _to_u8(gaussian_blur(x, s))) for s in settings.blur_sigmas],
        "noise": [(f"noise std {s}", gaussian_noise(real_u8, s, settings.seed + i))
                  for i, s in enumerate(settings.noise_stds)],
        "jpeg": [(f"jpeg quality {q}", jpeg(real_u8, q)) for q in settings.jpeg_qualities],
        "mix": [(f"{f:.0%} generated", mix(real_u8, generated_u8, f, settings.seed + 10 + i))
                for i, f in enumerate(settings.mix_fractions)],
    }


def attacker_edit(net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, radius: torch.Tensor | float,
                  steps: int = 10, exact_norm: bool = False) -> torch.Tensor:
    """L2 PGD that raises log p(y|x) under a plain classifier `net` (logits = net(x)[1] for a domain
    net, or net(x)), per-image radius `radius`, the default step (boosting.config.step_length); float [0, 1] NCHW in and out.
    No random start: the edit is a function of the images and the net. PGD may end inside the ball;
    `exact_norm` then lengthens each edit along its own direction to exactly its radius (a control
    must move each image as far as the edit it is compared with)."""
    radius = torch.as_tensor(radius, dtype=torch.float32).expand(len(images)).view(-1, 1, 1, 1)
    step = step_length(radius, steps)
    x0 = images.detach().float()
    x = x0.clone()
    flags = [(p, p.requires_grad) for p in net.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for _ in range(steps):
            x.requires_grad_(True)
            out = net(x)
            logits = out[1] if isinstance(out, tuple) else out
            objective = F.log_softmax(logits.float(), dim=1).gather(1, labels.view(-1, 1)).sum()
            (grad,) = torch.autograd.grad(objective, x)
            direction = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            x = (x.detach() + step * direction).clamp(0, 1)
            delta = x - x0
            scale = (radius / delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)).clamp(max=1.0)
            x = (x0 + delta * scale).detach()
    finally:
        for p, requires in flags:
            p.requires_grad_(requires)
    if exact_norm:
        x = move_to_norm(x0, x - x0, radius.flatten().to(x0.device))
    return x


# ----------------------------------------------------------------------------- the numbers


def pool_features(extractor, images_u8: np.ndarray, batch_size: int = 250) -> np.ndarray:
    """The judge's pooled features of uint8 NCHW images, in image order, float64."""
    device = getattr(extractor, "device", "cpu")  # a judge without one is a plain callable on CPU tensors
    parts = [in_cpu_chunks(extractor, device, torch.from_numpy(images_u8[i:i + batch_size]))["pool"]
             .double().cpu().numpy()
             for i in range(0, len(images_u8), batch_size)]
    return np.concatenate(parts)


def fid_kid(ref: ReferenceStatistics, features: np.ndarray) -> dict:
    mu, sigma = feature_statistics(features)
    fid = ref.fid(mu, sigma)
    kid, kid_std = ref.kid(features)
    if not all(np.isfinite([fid, kid, kid_std])):
        raise UserInputError("judge check: a non-finite FID or KID (broken features?)")
    return {"fid": fid, "kid": kid, "kid_std": kid_std}


def paired_bootstrap_std(ref: ReferenceStatistics, before: np.ndarray, after: np.ndarray, resamples: int,
                         seed: int) -> float:
    """Std of FID(after[i]) - FID(before[i]) over resampled image indices i (the same i for both:
    the two sets are the same images before and after an edit, so their noise is shared)."""
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        i = rng.integers(0, len(before), len(before))
        diffs.append(ref.fid(*feature_statistics(after[i])) - ref.fid(*feature_statistics(before[i])))
    return float(np.std(diffs, ddof=1))


def check_ladder(ref: ReferenceStatistics, features: Callable[[np.ndarray], np.ndarray], clean: dict,
                 families: dict[str, list]) -> dict:
    """Every family's FID and KID from clean to severe, and whether FID rises strictly along it."""
    out = {}
    for family, steps in families.items():
        rows = [dict(label="clean", **clean)]
        rows += [dict(label=label, **fid_kid(ref, features(images))) for label, images in steps]
        fids = [r["fid"] for r in rows]
        out[family] = {"steps": rows, "monotonic": all(a < b for a, b in zip(fids, fids[1:]))}
    return out


def check_transfer(ref: ReferenceStatistics, features: Callable[[np.ndarray], np.ndarray], base_u8: np.ndarray,
                   edits: dict[float, dict[str, np.ndarray]], settings: CheckSettings) -> dict:
    """FID of the generated images, of each adversarial edit and of its norm-matched random edit; an
    edit is *rewarded* when FID falls by more than `error_bars` paired-bootstrap stds (computed only when
    FID falls, else None)."""
    base_features = features(base_u8)
    base = fid_kid(ref, base_features)
    rows = []
    for eps, pair in edits.items():
        adv_features = features(pair["adversarial"])
        adversarial, random = fid_kid(ref, adv_features), fid_kid(ref, features(pair["random"]))
        change = adversarial["fid"] - base["fid"]
        # Only a fall can be a reward, so the error bar (the costly part: many FIDs) is needed only then.
        std = (paired_bootstrap_std(ref, base_features, adv_features, settings.bootstrap, settings.seed)
               if change < 0 else None)
        # How much more the adversarial edit moves FID than noise of the same norm: near 1 for a judge
        # that sees only the energy of an edit, far above 1 for one whose features adversarial directions move.
        random_change = random["fid"] - base["fid"]
        rows.append({"eps": eps, "mean_l2_change": float(pair["l2"]), "adversarial": adversarial, "random": random,
                     "fid_change": change, "relative_fid_change": change / base["fid"], "bootstrap_std": std,
                     "random_fid_change": random_change,
                     "adversarial_to_random": change / random_change if random_change else None,
                     "rewarded": bool(std is not None and change < -settings.error_bars * std)})
    return {"none": base, "edits": rows, "rewards_adversarial_edits": any(r["rewarded"] for r in rows)}


def make_transfer_edits(attacker: torch.nn.Module, generated_u8: np.ndarray, labels: np.ndarray,
                        settings: CheckSettings, batch_size: int = 250) -> dict[float, dict]:
    """For each eps: the attacker's edit of the generated images, and a random edit of the same
    per-image L2 norm (quantised to uint8 like every image a judge sees)."""
    edits = {}
    for eps in settings.transfer_eps:
        adversarial, random, l2 = [], [], []
        for i in range(0, len(generated_u8), batch_size):
            x = _to_float(generated_u8[i:i + batch_size])
            y = torch.from_numpy(np.asarray(labels[i:i + batch_size], dtype=np.int64))
            moved = attacker_edit(attacker, x, y, eps, settings.transfer_steps)
            norms = (moved - x).flatten(1).norm(dim=1)
            adversarial.append(_to_u8(moved))
            random.append(_to_u8(random_perturbation(x, norms, settings.seed + 1000, range(i, i + len(x)))))
            l2.append(norms)
        edits[float(eps)] = {"adversarial": np.concatenate(adversarial), "random": np.concatenate(random),
                             "l2": float(torch.cat(l2).mean())}
    return edits


def check_judge(extractor, reference_u8: np.ndarray, probe_u8: np.ndarray, generated_u8: np.ndarray,
                families: dict[str, list], edits: dict[float, dict], settings: CheckSettings) -> dict:
    """One judge through both tests. `reference_u8`: real images whose statistics are the reference;
    `probe_u8`: other real images (the clean rung); `generated_u8`: the images the edits started from."""
    features = lambda images: pool_features(extractor, images)  # noqa: E731
    ref = ReferenceStatistics.of(features(reference_u8))
    clean = fid_kid(ref, features(probe_u8))
    ladder = check_ladder(ref, features, clean, families)
    transfer = check_transfer(ref, features, generated_u8, edits, settings)
    monotonic = all(f["monotonic"] for f in ladder.values())
    reasons = [f"{name} ladder not monotonic" for name, f in ladder.items() if not f["monotonic"]]
    reasons += [f"rewards the attacker's eps {r['eps']:g} edit (FID {r['fid_change']:+.2f}, "
                f"bootstrap std {r['bootstrap_std']:.2f})" for r in transfer["edits"] if r["rewarded"]]
    return {"identity": extractor.identity, "clean": clean, "ladder": ladder, "transfer": transfer,
            "ladder_monotonic": monotonic, "passed": not reasons, "reasons": reasons}


def passing(report: dict, exclude: Sequence[str] = ()) -> list[str]:
    """Names of the judges that passed, in the report's order, less `exclude`."""
    return [name for name, r in report["judges"].items() if r.get("passed") and name not in exclude]


# ----------------------------------------------------------------------------- the whole check

DEFAULT_CANDIDATES = ("fmnist", "fmnist-shallow", "fmnist-mixer", "fmnist-tune-allconv", "fmnist-tune-resnet",
                      "fmnist-allconv", "fmnist-resnet", "fmnist-robust", "effnet-lite0", "effnet-lite0@128",
                      "effnet-lite0@224", "inception", "dinov2")
DEFAULT_ATTACKER = "fmnist-attacker"


def run_judge_check(judges: Sequence[str], real_u8: np.ndarray, generated_u8: np.ndarray, labels: np.ndarray,
                    attacker: str, reference_count: int, probe_count: int,
                    settings: CheckSettings = CheckSettings(), device: torch.device | str = "cpu",
                    log: Callable[[str], None] = print, job_folder: str | os.PathLike | None = None) -> dict:
    """Checks every judge in `judges` against real images `real_u8` (the first `reference_count`
    make the reference, the next `probe_count` the clean rung) with the generated images
    `generated_u8` (class `labels`) for the mixes and the edits. A judge that cannot be loaded here
    (no weights, no package) is listed as unavailable with the reason, and does not pass. With
    `job_folder`, the check is a `jobs.Job` there: each finished judge is cached, and a rerun on the
    same data, settings and attacker takes it from there instead of checking it again (a judge whose
    weights changed is redone)."""

    if len(real_u8) < reference_count + probe_count:
        raise UserInputError(f"judge check: {len(real_u8)} real images; the reference ({reference_count}) and the "
                             f"clean rung ({probe_count}) need {reference_count + probe_count}")
    if len(generated_u8) < probe_count:
        raise UserInputError(f"judge check: {len(generated_u8)} generated images; {probe_count} are needed")
    if real_u8.shape[1:] != generated_u8.shape[1:]:
        raise UserInputError(f"judge check: real images are {real_u8.shape[1:]} but generated ones "
                             f"{generated_u8.shape[1:]} (CxHxW)")
    reference_u8, probe_u8 = real_u8[:reference_count], real_u8[reference_count:reference_count + probe_count]
    generated_u8, labels = generated_u8[:probe_count], np.asarray(labels[:probe_count], dtype=np.int64)
    attacker_net, _ = load_domain_net(attacker, "cpu")
    attacker_identity = load_feature_extractor(attacker, "cpu").identity
    extractors, results = {}, {}
    for name in judges:  # loaded before any work, so a judge with the attacker's weights stops nothing half-done
        try:
            extractors[name] = load_feature_extractor(name, device)
        except UserInputError as err:
            results[name] = {"passed": False, "unavailable": str(err), "reasons": ["unavailable here"]}
            log(f"{name}: unavailable ({err})")
            continue
        if extractors[name].identity == attacker_identity:
            raise UserInputError(f"--judges {name}: has the weights of the attacker {attacker}; a judge must be "
                                 "unrelated to the network whose edits probe it")
    config = {"settings": dataclasses.asdict(settings), "attacker": attacker_identity,
              "data": [_digest(a) for a in (reference_u8, probe_u8, generated_u8, labels)]}
    with contextlib.ExitStack() as stack:
        job = None
        if job_folder is not None:
            job = stack.enter_context(Job(job_folder, config, row_problem=judge_row_problem))
        done = dict(job.rows) if job is not None else {}
        todo = [n for n in judges if n in extractors and done.get(n, {}).get("identity") != extractors[n].identity]
        if todo:
            log(f"edits by the attacker {attacker} at eps {', '.join(f'{e:g}' for e in settings.transfer_eps)}")
            edits = make_transfer_edits(attacker_net, generated_u8, labels, settings)
            families = ladders(probe_u8, generated_u8, settings)
        for name in judges:
            if name not in extractors:
                continue
            if name not in todo:
                results[name] = done[name]
                log(f"{name}: taken from {job_folder}")
                continue
            # as a row reads back from the job (keys sorted), so a resumed report has a straight run's bytes
            results[name] = json.loads(json.dumps(check_judge(extractors[name], reference_u8, probe_u8, generated_u8,
                                                              families, edits, settings), sort_keys=True))
            if job is not None:
                job.put_row(name, results[name])
            verdict = "passes" if results[name]["passed"] else "fails: " + "; ".join(results[name]["reasons"])
            log(f"{name}: {verdict}")
    results = {name: results[name] for name in judges}
    return {"format": "cmboost.judge_check", "version": FORMAT_VERSION, "settings": dataclasses.asdict(settings),
            "attacker": {"name": attacker, "identity": attacker_identity},
            "data": {"reference": reference_count, "probe": probe_count, "generated": len(generated_u8)},
            "judges": results}


_NUMBER = (int, float)
_ROW_FIELDS = {"identity": str, "clean": dict, "ladder": dict, "transfer": dict, "ladder_monotonic": bool,
               "passed": bool, "reasons": list}
_EDIT_FIELDS = {"eps": _NUMBER, "relative_fid_change": _NUMBER, "fid_change": _NUMBER,
                "bootstrap_std": _NUMBER + (type(None),), "adversarial_to_random": _NUMBER + (type(None),),
                "rewarded": bool}


def judge_row_problem(name: str, row) -> str | None:
    """What is wrong with a judge's cached row in a check-judges job's rows.json, or None when it
    holds every field the report and its table read."""
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    for field, kind in _ROW_FIELDS.items():
        if not isinstance(row.get(field), kind):
            return f"{field}: missing or not a {kind.__name__}"
    if not isinstance(row["clean"].get("fid"), _NUMBER):
        return "clean.fid: missing or not a number"
    edits = row["transfer"].get("edits")
    if not isinstance(edits, list) or not edits:
        return "transfer.edits: missing or not a list of edits"
    for i, edit in enumerate(edits):
        if not isinstance(edit, dict):
            return f"transfer.edits[{i}]: not an object"
        for field, kind in _EDIT_FIELDS.items():
            if not isinstance(edit.get(field, ...), kind):
                return f"transfer.edits[{i}].{field}: missing or of the wrong type"
    return None


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def format_table(report: dict) -> str:
    """One line per judge: clean FID, the ladder's verdict, the worst transfer change, pass or fail."""
    lines = [f"{'judge':<18} {'clean FID':>10} {'ladder':>10} {'worst edit FID change':>28} {'adv/random':>10}  verdict"]
    for name, r in report["judges"].items():
        if "unavailable" in r:
            lines.append(f"{name:<18} {'-':>10} {'-':>10} {'-':>28} {'-':>10}  unavailable")
            continue
        worst = min(r["transfer"]["edits"], key=lambda e: e["relative_fid_change"])
        bar = "" if worst["bootstrap_std"] is None else f", +-{worst['bootstrap_std']:.2f}"
        change = f"{worst['relative_fid_change']:+.1%} (eps {worst['eps']:g}{bar})"
        ladder = "monotonic" if r["ladder_monotonic"] else "broken"
        ratio = worst["adversarial_to_random"]
        ratio = "-" if ratio is None else f"{ratio:.2f}"
        lines.append(f"{name:<18} {r['clean']['fid']:>10.2f} {ladder:>10} {change:>28} {ratio:>10}  "
                     f"{'passes' if r['passed'] else 'fails'}")
    return "\n".join(lines)
