"""cmboost: boost few-step generator samples with an adversarially trained joint classifier-discriminator.

The Python API mirrors the command line, one function per verb (cmboost/api.py, docs/api.md):
`cmboost.sample`, `cmboost.boost`, `cmboost.tune`, `cmboost.evaluate`, `cmboost.evaluate_ref`,
`cmboost.check_judges`, `cmboost.diagnose`, `cmboost.train_jcd`, `cmboost.train_cm`, `cmboost.train_features`, and `cmboost.asset` for the shipped
files. The demo is `cmboost.demo.run.run_demo`.
"""

__version__ = "0.1.0"

import os as _os
import sys as _sys

# OpenMP's idle workers sleep instead of spinning (libgomp reads this once, when torch loads it, so it is
# set before anything imports torch; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins). Spinning
# workers are fast on an idle machine but collapse beside any other busy process: on a 2-core CPU with
# one core busy, EfficientNet-Lite0's features of 250 images took 4.39 s spinning against 0.46 s
# sleeping, while idle they cost 0.25 s against 0.35 s (benchmarks/README.md). Results are the same
# either way; only the waiting differs.
OPENMP_WAIT_POLICY = "PASSIVE"
if "torch" not in _sys.modules and "GOMP_SPINCOUNT" not in _os.environ:
    _os.environ.setdefault("OMP_WAIT_POLICY", OPENMP_WAIT_POLICY)

__all__ = ["asset", "boost", "check_judges", "diagnose", "evaluate", "evaluate_ref", "sample", "train_cm",
           "train_features", "train_jcd", "tune", "__version__"]


def __getattr__(name: str):
    """The API functions load with their first use (PEP 562): `import cmboost`, which the console script
    does first, must not import torch, so that Ctrl-C while torch loads is caught by the command line."""
    if name in __all__:
        from cmboost import api

        return getattr(api, name)
    raise AttributeError(f"module 'cmboost' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
