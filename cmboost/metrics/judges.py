"""Which feature network may tune and which may only report: the separation that makes results honest.

Boosting settings are chosen by one feature network (the *tuning* judge) on validation samples
against training-split statistics. Results are reported by *reporting* judges that took no part in
the choice. A setting tuned on the network that reports it measures the network, not the method,
so `cmboost tune` refuses a reporting judge, by name and by weights (a copy of a reporting judge's
file under another name is refused too).

Judges for Fashion-MNIST:
- fmnist            tuning     VGG-style CNN, BatchNorm, max pooling (seed 60221), train split
- fmnist-allconv    reporting  all-convolutional net, strided convolutions (seed 4242), train split
- fmnist-resnet     reporting  BatchNorm residual net, SiLU (seed 1717), train split
- fmnist-robust     reporting  all-convolutional net, adversarially trained (L2 eps 1; seed 2929)
- effnet-lite0[@R]  reporting  EfficientNet-Lite0 with ImageNet weights (never saw Fashion-MNIST),
                               images upsampled to R px (64, 128, 224) and replicated to RGB, as
                               FID-Inception is used on small data sets
- fmnist-shallow    tuning     three wide large-kernel convs, GroupNorm, ELU, average pooling (seed 3131)
- fmnist-mixer      tuning     MLP-Mixer over 4x4 patches, no convolution after the embedding (seed 5353)
- fmnist-tune-allconv  tuning  all-convolutional, as fmnist-allconv but its own seed (6161)
- fmnist-tune-resnet   tuning  BatchNorm residual net, as fmnist-resnet but its own seed (7373)
- fmnist-attacker   attacker   a plain VGG (seed 777) that judges nothing: its adversarial edits probe
                               the judges (cmboost check-judges) and make the demo's plain-classifier control

A reporting judge is a *candidate*: it reports only once `cmboost check-judges` has passed it
(metrics/judge_check.py), and the demo's panel is the candidates that passed. A tuning judge sits on
a tuning committee (cmboost tune --judge a,b) only once it has passed the same check: a judge that
the attacker's edits fool would let the tuning pick edits that fool it.
"""

from __future__ import annotations

import dataclasses

from cmboost.errors import UserInputError


@dataclasses.dataclass(frozen=True)
class Judge:
    name: str          # the --features / --judge spec
    role: str          # "tuning" or "reporting"
    family: str        # what kind of network, in a few words (printed in reports)


JUDGES = {
    "fmnist": Judge("fmnist", "tuning", "VGG-style CNN trained on the Fashion-MNIST train split"),
    "fmnist-allconv": Judge("fmnist-allconv", "reporting",
                            "all-convolutional CNN (other architecture and seed) trained on the train split"),
    "fmnist-resnet": Judge("fmnist-resnet", "reporting",
                           "BatchNorm residual CNN (a third architecture, own seed) trained on the train split"),
    "fmnist-robust": Judge("fmnist-robust", "reporting",
                           "all-convolutional CNN adversarially trained (L2 PGD, eps 1) on the train split"),
    "effnet-lite0": Judge("effnet-lite0", "reporting",
                          "EfficientNet-Lite0 with ImageNet weights at 64 px, no Fashion-MNIST training"),
    "effnet-lite0@128": Judge("effnet-lite0@128", "reporting",
                              "EfficientNet-Lite0 with ImageNet weights at 128 px, no Fashion-MNIST training"),
    "effnet-lite0@224": Judge("effnet-lite0@224", "reporting",
                              "EfficientNet-Lite0 with ImageNet weights at 224 px, no Fashion-MNIST training"),
    "fmnist-shallow": Judge("fmnist-shallow", "tuning",
                            "shallow wide CNN (5x5 convs, GroupNorm, ELU, average pooling, seed 3131) trained on "
                            "the train split"),
    "fmnist-mixer": Judge("fmnist-mixer", "tuning",
                          "MLP-Mixer over 4x4 patches (seed 5353) trained on the train split"),
    "fmnist-tune-allconv": Judge("fmnist-tune-allconv", "tuning",
                                 "all-convolutional CNN (as fmnist-allconv, own seed 6161) trained on the train split"),
    "fmnist-tune-resnet": Judge("fmnist-tune-resnet", "tuning",
                                "BatchNorm residual CNN (as fmnist-resnet, own seed 7373) trained on the train split"),
    "fmnist-attacker": Judge("fmnist-attacker", "attacker",
                             "plain VGG-style CNN (seed 777) whose adversarial edits probe the judges"),
}
TUNING_JUDGE = "fmnist"
DEFAULT_FEATURES = "fmnist"  # the network `cmboost evaluate` measures with when --features is not given
REPORTING_JUDGES = tuple(name for name, judge in JUDGES.items() if judge.role == "reporting")
ATTACKER = "fmnist-attacker"


def describe(name: str) -> str:
    judge = JUDGES.get(name)
    return judge.family if judge else f"feature net {name}"


def refuse_reporting_name(name: str, flag: str = "--judge") -> None:
    """Raises one line when `name` is a reporting judge's (checked before anything is loaded)."""
    if str(name) in REPORTING_JUDGES:
        raise UserInputError(f"{flag} {name}: is a reporting judge; settings tuned on it could not be "
                             f"reported honestly by it. Tune with {TUNING_JUDGE} (or your own domain net) and keep "
                             f"{', '.join(REPORTING_JUDGES)} for the report")
