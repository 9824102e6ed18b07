"""cmboost: boost few-step generator samples with an adversarially trained joint classifier-discriminator.

The Python API mirrors the command line, one function per verb (cmboost/api.py, docs/api.md):
`cmboost.sample`, `cmboost.boost`, `cmboost.tune`, `cmboost.evaluate`, `cmboost.evaluate_ref`,
`cmboost.check_judges`, `cmboost.diagnose`, `cmboost.train_jcd`, `cmboost.train_cm`, `cmboost.train_features`, and `cmboost.asset` for the shipped
files. The demo is `cmboost.demo.run_demo`.
"""

__version__ = "0.1.0"

from cmboost.api import (asset, boost, check_judges, diagnose, evaluate, evaluate_ref, sample,  # noqa: E402
                         train_cm, train_features, train_jcd, tune)

__all__ = ["asset", "boost", "check_judges", "diagnose", "evaluate", "evaluate_ref", "sample", "train_cm",
           "train_features", "train_jcd", "tune", "__version__"]
