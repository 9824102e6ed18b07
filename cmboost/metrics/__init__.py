"""Evaluation: FID, sFID, Inception Score, precision/recall, density/coverage, KID and FD-DINOv2.

The steps are pure: images -> features (extract.py, through an extractor of features.py,
dinov2.py, effnet.py or domain_net.py) -> statistics -> metrics (stats.py). reference.py holds
reference batches (OpenAI .npz, EDM2 .pkl read by ref_pickle.py); evaluate.py is the pipeline the
CLI and the demo call, under fixed result keys (docs/evaluation.md).
"""

from cmboost.metrics.evaluate import (METRIC_KEYS, evaluate_file, evaluate_images, evaluate_source, extract_features,
                                      format_table, write_json)
from cmboost.metrics.features import (DomainFeatures, FeatureExtractor, InceptionFeatures, load_feature_extractor,
                                      resolve_inception_weights)
from cmboost.metrics.knn import knn_radii, precision_recall
from cmboost.metrics.reference import Reference, load_reference, reference_stats, save_reference
from cmboost.metrics.stats import RunningStats, feature_statistics, frechet_distance, inception_score

__all__ = [
    "METRIC_KEYS", "evaluate_file", "evaluate_images", "evaluate_source", "extract_features", "format_table",
    "write_json",
    "DomainFeatures", "FeatureExtractor", "InceptionFeatures", "load_feature_extractor", "resolve_inception_weights",
    "Reference", "load_reference", "reference_stats", "save_reference",
    "RunningStats", "feature_statistics", "frechet_distance", "inception_score", "knn_radii", "precision_recall",
]
