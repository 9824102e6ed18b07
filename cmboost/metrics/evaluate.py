"""The evaluation pipeline: images -> features (batched, sharded under torchrun) -> metrics.

Result keys are fixed: fid, sfid, is, precision, recall, kid, kid_std, density, coverage (a metric that
cannot be computed is None, and notes[key] says why), then fd_<name> for each feature network when
several are asked for, plus num_samples, num_reference, feature_net, features (docs/evaluation.md).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from cmboost.errors import UserInputError
from cmboost.files.atomic import atomic_open, refuse_existing
from cmboost.files.samples import ArraySource, ImageSource, open_samples
from cmboost.metrics.extract import extract_features
from cmboost.metrics.feature_nets import EXTRACT_BATCH, FeatureOptions, extractors_for, fd_results, reference_for
from cmboost.metrics.features import FeatureExtractor
from cmboost.metrics.judges import DEFAULT_FEATURES
from cmboost.metrics.prepared import ReferenceStatistics
from cmboost.metrics.reference import Reference, load_references
from cmboost.metrics.stats import frechet_distance, inception_score
from cmboost.records import FEATURE_PRECISION
from cmboost.runtime import dist_info

METRIC_KEYS = ("fid", "sfid", "is", "precision", "recall")
KID_KEYS = ("kid", "kid_std")  # unbiased KID and its std over subsets; they follow METRIC_KEYS in every result
DC_KEYS = ("density", "coverage")  # Naeem et al. 2020 on the precision k-NN balls; they follow KID_KEYS
IS_SPLIT_SIZE = 5000   # guided-diffusion evaluator
PR_NEIGHBOURS = 3      # k of the k-NN manifolds


# ----------------------------------------------------------------------------- feature extraction


def evaluate_source(source: ImageSource, reference, features=DEFAULT_FEATURES, batch_size: int = EXTRACT_BATCH,
                    device: torch.device | str | None = None, precision: str = FEATURE_PRECISION,
                    inception_weights: str | os.PathLike | None = None, progress: bool = False,
                    dinov2_weights: str | os.PathLike | None = None, bootstrap: int = 0) -> dict:
    """FID, sFID, IS, precision, recall, KID, density and coverage of the images in `source` against
    `reference` (a Reference, a path, or several: see reference.load_references), in the features of
    the first of `features` (an extractor, a spec, "inception,dinov2", or a list); with several,
    also the Frechet distance in each network's features (fd_<name>) against the reference made with it.
    `bootstrap` > 0 adds "bootstrap": FID and KID on that many seeded resamplings of the images
    (ReferenceStatistics.bootstrap, lists), which two evaluations of the same images pair."""
    refs = load_references(reference)
    extractors = extractors_for(features, device, precision, inception_weights, dinov2_weights)
    extractor = extractors[0]
    for each in extractors:
        each.check_images(source.shape, source.name)
    ref = reference_for(refs, extractor)
    # Reference images of another size or channel count are other data, though a resizing network takes
    # both; only the zero padding of a domain net (28x28 Fashion-MNIST to 32x32) makes them the same.
    if ref.images is not None and extractor.padded_shape(ref.images.shape[1:]) != extractor.padded_shape(source.shape):
        raise UserInputError(f"{source.name}: images are {'x'.join(map(str, source.shape))} (CxHxW), but the "
                             f"--ref {ref.source} images (arr_0) are {'x'.join(map(str, ref.images.shape[1:]))}; "
                             f"compare with a reference of images the samples' size")
    if len(source) <= PR_NEIGHBOURS:
        raise UserInputError(f"{source.name}: {len(source)} images; need more than {PR_NEIGHBOURS} "
                             "(k-NN precision/recall)")
    samples = extract_features(source, extractor, batch_size, progress=progress, desc="samples")
    others = []  # (extractor, its reference or None, the samples' statistics in its features or None)
    for other in extractors[1:]:
        other_ref = reference_for(refs, other, required=False)
        stats = None if other_ref is None or other_ref.mu is None else extract_features(
            source, other, batch_size, keep=np.empty(0, dtype=np.int64), keep_probs=False, progress=progress,
            desc=f"samples ({other.name})")
        others.append((other, other_ref, stats))

    notes: dict[str, str] = {}
    ref_features = ref.features
    if ref_features is None and ref.images is not None:
        extractor.check_images(ref.images.shape[1:], f"{ref.source} (arr_0)")
        ref_set = extract_features(ArraySource(ref.images, f"{ref.source} arr_0"), extractor, batch_size,
                                   keep_probs=False, progress=progress, desc="reference")
        ref_features = ref_set.pool
        if ref.mu is None:
            ref.mu, ref.sigma, ref.mu_s, ref.sigma_s = ref_set.mu, ref_set.sigma, ref_set.mu_s, ref_set.sigma_s

    result: dict = {}
    if dist_info().is_main:
        prepared = prepared_statistics(ref, ref_features)
        few = samples.pool is not None and len(samples.pool) == samples.count <= len(samples.mu)
        result["fid"] = prepared.fid(samples.mu, samples.sigma, rows=samples.pool if few else None)
        if samples.count < len(samples.mu):
            notes["fid"] = (f"{source.name}: {samples.count} images for {len(samples.mu)}-d features: the sample "
                            f"covariance is rank-deficient and FID is biased high; use at least {len(samples.mu)} "
                            f"images (papers use 50000)")
        if samples.mu_s is None:
            result["sfid"], notes["sfid"] = None, extractor.spatial_reason
        elif ref.mu_s is None:
            result["sfid"], notes["sfid"] = None, f"{ref.source} holds no spatial statistics (mu_s, sigma_s)"
        else:
            result["sfid"] = frechet_distance(samples.mu_s, samples.sigma_s, ref.mu_s, ref.sigma_s)
        if samples.probs is None:
            result["is"], notes["is"] = None, extractor.logits_reason or f"{extractor.name} gives no class logits"
        else:
            result["is"] = inception_score(samples.probs, IS_SPLIT_SIZE)
        knn_keys = ("precision", "recall") + DC_KEYS
        if ref_features is None or len(ref_features) <= PR_NEIGHBOURS:
            reason = (f"{ref.source} holds neither reference images nor features" if ref_features is None else
                      f"{ref.source}: {len(ref_features)} reference rows, too few for k=3")
            result.update(dict.fromkeys(knn_keys))
            notes.update(dict.fromkeys(knn_keys, reason))
        else:
            # on the extractor's device, where the distances are computed
            result.update(prepared.knn_metrics(samples.pool, PR_NEIGHBOURS, extractor.device))
        if ref_features is None or len(ref_features) < 2 or len(samples.pool) < 2:
            result["kid"] = result["kid_std"] = None
            notes["kid"] = notes["kid_std"] = f"{ref.source}: KID needs reference features and at least 2 rows on each side"
        else:
            result["kid"], result["kid_std"] = prepared.kid(samples.pool)
        fd_keys = fd_results(result, notes, extractor, others) if others else {}
        result = {key: result[key] for key in METRIC_KEYS + KID_KEYS + DC_KEYS + tuple(fd_keys)}
        if fd_keys:
            result["fd_feature_nets"] = fd_keys
        if bootstrap > 0:
            if ref_features is None:
                raise UserInputError(f"{ref.source}: a bootstrap of KID needs reference features")
            result["bootstrap"] = {metric: {"all": values["all"], "resampled": values["resampled"].tolist()}
                                   for metric, values in prepared.bootstrap(samples.pool, bootstrap).items()}
        result.update(notes={k: v for k, v in notes.items()}, num_samples=samples.count,
                      num_reference=None if ref_features is None else int(len(ref_features)),
                      reference_count=ref.count, feature_net=extractor.identity, features=extractor.name,
                      samples=source.name, reference=ref.source, feature_precision=extractor.precision)
    info = dist_info()
    if info.enabled:
        box = [result]
        torch.distributed.broadcast_object_list(box, src=0)
        result = box[0]
    return result


def prepared_statistics(ref: Reference, ref_features: np.ndarray | None) -> ReferenceStatistics:
    """The reference's side of every metric (ReferenceStatistics), made on its first evaluation and
    kept on the Reference, so that the next evaluation against it (tune's next candidate, the demo's
    next row) reuses its Cholesky factor, k-NN radii and KID subsets."""
    key = ("statistics", None if ref_features is None else len(ref_features))
    if key not in ref.cache:
        ref.cache[key] = ReferenceStatistics(ref.mu, ref.sigma, ref_features)
    return ref.cache[key]


def evaluate_images(images_u8: np.ndarray, reference: Reference | str | os.PathLike,
                    features: FeatureExtractor | str = DEFAULT_FEATURES, batch_size: int = EXTRACT_BATCH,
                    device: torch.device | str | None = None, precision: str = FEATURE_PRECISION,
                    inception_weights: str | os.PathLike | None = None, progress: bool = False,
                    dinov2_weights: str | os.PathLike | None = None, bootstrap: int = 0) -> dict:
    """Metrics of in-memory uint8 NCHW images against a reference (a Reference or a .npz/.pkl path)."""
    return evaluate_source(ArraySource(np.asarray(images_u8), "images"), reference, features, batch_size,
                           device, precision, inception_weights, progress, dinov2_weights, bootstrap)


def evaluate_file(samples: str | os.PathLike, reference: Reference | str | os.PathLike,
                  features: FeatureExtractor | str = DEFAULT_FEATURES, batch_size: int = EXTRACT_BATCH,
                  device: torch.device | str | None = None, precision: str = FEATURE_PRECISION,
                  inception_weights: str | os.PathLike | None = None, progress: bool = False,
                  dinov2_weights: str | os.PathLike | None = None) -> dict:
    """Metrics of a sample .npz (streamed) or PNG folder against a reference."""
    return evaluate_source(open_samples(samples), reference, features, batch_size, device, precision,
                           inception_weights, progress, dinov2_weights)


# ----------------------------------------------------------------------------- the verb


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateRun(FeatureOptions):
    """One `cmboost evaluate`: samples against references, checked when built."""

    samples: str                # a sample .npz (OpenAI layout) or a PNG folder
    refs: tuple[str, ...]       # .npz or .pkl references, one per feature network at most
    json: str | None = None     # also write the results here

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.refs, str) or not self.refs:
            raise UserInputError("--ref REF.npz is required (make one with 'cmboost evaluate-ref')")
        if self.json is not None:
            refuse_existing(self.json, self.overwrite, flag="--json")


def evaluate(run: EvaluateRun) -> dict:
    """The metrics of `run.samples` (every rank gets them), written to `run.json` on rank 0 when given."""
    source = open_samples(run.samples)
    references = load_references(list(run.refs))
    result = evaluate_source(source, references, run.extractors(), run.batch_size, progress=run.progress)
    if run.json is not None and dist_info().is_main:
        write_json(run.json, result, overwrite=run.overwrite)
    return result


# ----------------------------------------------------------------------------- reporting


def format_table(result: dict) -> str:
    labels = {"fid": "FID", "sfid": "sFID", "is": "IS", "precision": "Precision", "recall": "Recall"}
    lines = [f"{'metric':<10} value   ({result.get('num_samples')} samples, features {result.get('features')})"]
    for key in METRIC_KEYS:
        value = result.get(key)
        text = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else \
            f"n/a ({result.get('notes', {}).get(key, 'not computed')})"
        lines.append(f"{labels[key]:<10} {text}")
    if isinstance(result.get("kid"), float):
        lines.append(f"{'KID':<10} {result['kid']:.6f} +- {result['kid_std']:.6f} (std over subsets)")
    extra = {"density": "Density", "coverage": "Coverage"}
    extra.update({key: f"FD {key[3:]}" for key in result if key.startswith("fd_") and key != "fd_feature_nets"})
    for key, label in extra.items():
        if key in result:
            value = result[key]
            text = f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else \
                f"n/a ({result.get('notes', {}).get(key, 'not computed')})"
            lines.append(f"{label:<10} {text}")
    return "\n".join(lines)


def write_json(path: str | os.PathLike, result: dict, overwrite: bool = False) -> Path:
    """Atomic JSON write (no NaN: missing metrics are null with a note)."""

    path = Path(path)
    refuse_existing(path, overwrite)
    with atomic_open(path, "w") as fh:
        json.dump(result, fh, indent=2, sort_keys=False, allow_nan=False)
        fh.write("\n")
    return path
