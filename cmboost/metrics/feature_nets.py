"""Several feature networks in one evaluation (--features inception,dinov2): how evaluate and
evaluate-ref run them (FeatureOptions), the extractors, the reference that goes with each network,
and the Frechet distance in each network's features."""

from __future__ import annotations

import dataclasses

import torch

from cmboost.errors import UserInputError
from cmboost.metrics.features import FeatureExtractor, load_feature_extractor
from cmboost.metrics.judges import DEFAULT_FEATURES
from cmboost.metrics.ref_pickle import fd_key
from cmboost.metrics.reference import Reference
from cmboost.metrics.stats import frechet_distance
from cmboost.records import FEATURE_PRECISION, check_at_least
from cmboost.runtime import init_distributed, resolve_device

EXTRACT_BATCH = 256  # images per forward pass of a feature network


@dataclasses.dataclass(frozen=True, kw_only=True)
class FeatureOptions:
    """The fields `cmboost evaluate` and `cmboost evaluate-ref` share: which feature networks, where and
    how they run. Checked when built; `extractors()` resolves the device once and loads the networks."""

    features: str = DEFAULT_FEATURES  # comma-separated: the first for every metric, the others add fd_<name>
    batch_size: int = EXTRACT_BATCH
    device: str = "auto"
    precision: str = FEATURE_PRECISION
    inception_weights: str | None = None
    dinov2_weights: str | None = None
    threads: int = 0                  # torch CPU threads; 0: torch's choice
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self):
        check_at_least(self, 1, ("batch_size",))
        check_at_least(self, 0, ("threads",))
        if not isinstance(self.features, str) or any(not spec.strip() for spec in self.features.split(",")):
            raise UserInputError(f"--features {self.features!r}: empty name in the list")

    @property
    def num_networks(self) -> int:
        return len(self.features.split(","))

    def extractors(self) -> list[FeatureExtractor]:
        """The networks of `features` on the resolved device (set up for torchrun), threads set."""
        if self.threads:
            torch.set_num_threads(self.threads)
        device = resolve_device(self.device)
        init_distributed(device)
        return extractors_for(self.features, device, self.precision, self.inception_weights, self.dinov2_weights)


def extractors_for(features, device, precision, inception_weights, dinov2_weights) -> list[FeatureExtractor]:
    """The extractors of `features`: one extractor or spec, a comma-separated spec, or a list; each
    network at most once (their results share the fd_<name> keys)."""
    specs = features.split(",") if isinstance(features, str) else \
        list(features) if isinstance(features, (list, tuple)) else [features]
    specs = [spec.strip() if isinstance(spec, str) else spec for spec in specs]
    if not specs or any(spec == "" for spec in specs):
        raise UserInputError(f"--features {features!r}: empty name in the list")
    extractors = [load_feature_extractor(spec, device, precision, inception_weights, dinov2_weights=dinov2_weights)
                  for spec in specs]
    keys = [fd_key(e.name) for e in extractors]
    if len(set(keys)) != len(keys):
        raise UserInputError(f"--features {features!r}: a feature network is listed twice")
    return extractors


def reference_for(refs: list[Reference], extractor: FeatureExtractor, required: bool = True) -> Reference | None:
    """The reference made with `extractor`'s network; for the first extractor a mismatch is an error."""
    # one with images or features first: it also gives precision/recall, KID, density and coverage
    matching = sorted((ref for ref in refs if ref.net == extractor.identity),
                      key=lambda ref: ref.features is None and ref.images is None)
    if not matching:
        if not required:
            return None
        if len(refs) == 1:
            refs[0].check_against(extractor)  # raises, naming both networks
        raise UserInputError(f"--ref: none of {', '.join(r.source for r in refs)} was made with --features "
                             f"{extractor.name} ({extractor.identity}); they hold {', '.join(r.net for r in refs)}")
    matching[0].check_against(extractor)
    return matching[0]


def fd_results(result: dict, notes: dict, first: FeatureExtractor, others: list) -> dict[str, str]:
    """Adds fd_<name> for every feature network (the first one's is its FID); returns {key: identity}."""
    keys = {fd_key(first.name): first.identity}
    result[fd_key(first.name)] = result["fid"]
    for other, other_ref, stats in others:
        key = fd_key(other.name)
        keys[key] = other.identity
        if stats is None:
            result[key] = None
            notes[key] = (f"no --ref was made with {other.identity}; add one (an EDM2 .pkl, or "
                          f"'cmboost evaluate-ref --features {other.name}')" if other_ref is None
                          else f"{other_ref.source} holds no mu/sigma")
        else:
            result[key] = frechet_distance(other_ref.mu, other_ref.sigma, stats.mu, stats.sigma)
    return keys
