"""Evaluation by the guided-diffusion protocol: FID, sFID, Inception Score, precision and recall.

stats.py: features -> statistics -> metrics (pure); features.py: feature networks (Inception-v3 via
torch-fidelity, domain nets); domain_net.py: the Fashion-MNIST feature net and its training;
reference.py: reference batches; evaluate.py: the pipeline the CLI and the demo call.
"""

from cmboost.metrics.evaluate import (METRIC_KEYS, evaluate_file, evaluate_images, evaluate_source, extract_features,
                                      format_table, write_json)
from cmboost.metrics.features import (DomainFeatures, FeatureExtractor, InceptionFeatures, load_feature_extractor,
                                      resolve_inception_weights)
from cmboost.metrics.reference import Reference, load_reference, reference_stats, save_reference
from cmboost.metrics.stats import (RunningStats, feature_statistics, frechet_distance, inception_score,
                                   knn_radii, precision_recall)

__all__ = [
    "METRIC_KEYS", "evaluate_file", "evaluate_images", "evaluate_source", "extract_features", "format_table",
    "write_json",
    "DomainFeatures", "FeatureExtractor", "InceptionFeatures", "load_feature_extractor", "resolve_inception_weights",
    "Reference", "load_reference", "reference_stats", "save_reference",
    "RunningStats", "feature_statistics", "frechet_distance", "inception_score", "knn_radii", "precision_recall",
]
