"""`cmboost evaluate-ref` (`cmboost.evaluate_ref`): the statistics of a dataset split under one or more
feature networks, written as cmboost's .npz (one network, with the features of some images for
precision/recall) or an EDM2-style .pkl (mu and sigma per network)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from cmboost.errors import UserInputError
from cmboost.files.atomic import refuse_existing
from cmboost.files.datasets import load_dataset
from cmboost.files.samples import ArraySource
from cmboost.metrics.evaluate import PR_NEIGHBOURS
from cmboost.metrics.extract import extract_features
from cmboost.metrics.feature_nets import FeatureOptions
from cmboost.metrics.ref_pickle import save_pickled_references
from cmboost.metrics.reference import reference_stats, save_reference
from cmboost.records import check_at_least, check_seed, param_default
from cmboost.runtime import dist_info


@dataclasses.dataclass(frozen=True, kw_only=True)
class ReferenceRun(FeatureOptions):
    """One `cmboost evaluate-ref`: checked when built, before any network loads."""

    data: str                 # fmnist, imagenet64:PATH or folder:PATH
    out: str                  # .npz (one network) or .pkl (EDM2 layout)
    split: str = "test"
    data_dir: str | None = None
    num_features: int = param_default(reference_stats, "num_features")  # .npz: images whose features are kept
    seed: int = param_default(reference_stats, "seed")                  # which images those are

    def __post_init__(self):
        super().__post_init__()
        check_at_least(self, 1, ("num_features",))
        check_seed(self)
        check_reference_request(self.out, self.num_networks, self.num_features)


def check_reference_request(out: str | os.PathLike, num_networks: int, num_features: int) -> str:
    """The kind of reference file `out` names (".npz" or ".pkl"), checked against what it must hold."""

    kind = Path(out).suffix.lower()
    if kind not in (".npz", ".pkl"):
        raise UserInputError(f"--out {out}: must end in .npz (cmboost/OpenAI layout) or .pkl (EDM2 layout)")
    if kind == ".npz" and num_networks > 1:
        raise UserInputError(f"--out {out}: an .npz reference holds one feature network, --features lists "
                             "several; write a .pkl, or one .npz per network")
    if num_features <= PR_NEIGHBOURS:
        raise UserInputError(f"--num-features {num_features}: need at least {PR_NEIGHBOURS + 1} for "
                             f"k={PR_NEIGHBOURS} precision/recall")
    return kind


def make_reference(run: ReferenceRun) -> dict | None:
    """The statistics of `run.data`'s split written to `run.out`: cmboost's .npz (the first network, with
    the features of `num_features` images for precision/recall) or an EDM2-style .pkl (mu and sigma per
    network). Returns a summary on rank 0, None on the other ranks."""
    kind = Path(run.out).suffix.lower()
    out, overwrite, progress, batch_size = run.out, run.overwrite, run.progress, run.batch_size
    refuse_existing(out, overwrite)
    images, _, _ = load_dataset(run.data, run.split, run.data_dir)
    source = f"{run.data} {run.split}"
    extractors = run.extractors()
    if kind == ".npz":
        ref = reference_stats(images, extractors[0], batch_size, run.num_features, run.seed, source=source,
                              progress=progress)
        if not dist_info().is_main:
            return None
        save_reference(out, ref, overwrite=overwrite)
        return {"out": str(out), "feature_net": ref.net, "count": ref.count, "features_kept": int(len(ref.features)),
                "spatial": ref.mu_s is not None}
    stats = []
    for net in extractors:
        net.check_images(images.shape[1:], source)
        feats = extract_features(ArraySource(images, source), net, batch_size, keep=np.empty(0, dtype=np.int64),
                                 keep_probs=False, progress=progress, desc=f"reference ({net.name})")
        stats.append((net.name, net.identity, feats.mu, feats.sigma))
    if not dist_info().is_main:
        return None
    save_pickled_references(out, stats, len(images), overwrite=overwrite)
    return {"out": str(out), "feature_nets": [s[1] for s in stats], "count": len(images)}
