"""train-cm's records: the UNet's shape, the run's settings (the mode's own defaults where a mode
differs), how one invocation loops, and the run itself, each checked when built."""

from __future__ import annotations

import dataclasses

from cmboost.cm.losses import DISTANCES
from cmboost.cm.unet import attention_rates
from cmboost.errors import UserInputError
from cmboost.records import (check_above, check_at_least, check_choice, check_finite, check_fraction, check_seed,
                             field_default, flag_of)

MODES = ("edm", "cd", "ct", "ect")


# Fashion-MNIST's 28x28 images are zero-padded to 32x32: the UNet halves the size at each level.
FMNIST_SIZE = 32


# ECT exports a consistency model (kind "ct") on a 40-level grid whose 2-step middle level, 24, is
# sigma 0.823: the 0.821 that ECT samples 2 steps with
ECT_SAMPLER = ((0, 24, 39), 40)


@dataclasses.dataclass(frozen=True)
class UNetShape:
    """The size of a small ADM UNet (what train-cm's architecture flags set), checked when built.
    The data gives the rest: image size, channels and classes."""

    model_channels: int = 32
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple[int, ...] = (8,)  # in pixels: 8 = attention at 8x8
    dropout: float = 0.0
    num_head_channels: int = 32                    # -1: one head

    def __post_init__(self):
        check_finite(self)
        for name in ("channel_mult", "attention_resolutions"):  # typed comma-separated, shown so
            values = getattr(self, name)
            if not values or min(values) < 1:
                raise UserInputError(f"{flag_of(name)} {','.join(map(str, values))}: needs integers >= 1")
        check_at_least(self, 1, ("model_channels", "num_res_blocks"))
        check_fraction(self, ("dropout",))
        if self.num_head_channels != -1:
            check_at_least(self, 1, ("num_head_channels",))

    def config(self, image_size: int, in_channels: int, num_classes: int | None) -> dict:
        """The UNet config dict (as saved in the run's config.json and checkpoints) for this data."""
        rates = attention_rates(self.attention_resolutions, image_size)
        last = len(self.channel_mult) - 1
        for level, mult in enumerate(self.channel_mult):  # the middle block, at the last level, always attends
            width = mult * self.model_channels
            attends = 2 ** level in rates or level == last
            if attends and self.num_head_channels != -1 and width % self.num_head_channels:
                raise UserInputError(f"--num-head-channels {self.num_head_channels}: the UNet attends at width "
                                     f"{width} (--model-channels {self.model_channels} x --channel-mult {mult}), "
                                     f"which does not split into heads of {self.num_head_channels}")
        return dict(image_size=image_size, in_channels=in_channels, model_channels=self.model_channels,
                    out_channels=in_channels, num_res_blocks=self.num_res_blocks,
                    attention_resolutions=list(attention_rates(self.attention_resolutions, image_size)),
                    dropout=self.dropout, channel_mult=list(self.channel_mult), num_classes=num_classes,
                    num_heads=1, num_head_channels=self.num_head_channels, use_scale_shift_norm=True,
                    resblock_updown=True)


_SHAPE = UNetShape()


def small_unet_config(image_size: int = 32, in_channels: int = 1, num_classes: int | None = 10,
                      model_channels: int = _SHAPE.model_channels, channel_mult: tuple[int, ...] = _SHAPE.channel_mult,
                      num_res_blocks: int = _SHAPE.num_res_blocks,
                      attention_resolutions: tuple[int, ...] = _SHAPE.attention_resolutions,
                      dropout: float = _SHAPE.dropout, num_head_channels: int = _SHAPE.num_head_channels) -> dict:
    """A small ADM UNet for 32x32 single-channel data; `attention_resolutions` in pixels (8 = at 8x8)."""
    shape = UNetShape(model_channels, tuple(channel_mult), num_res_blocks, tuple(attention_resolutions), dropout,
                      num_head_channels)
    return shape.config(image_size, in_channels, num_classes)


@dataclasses.dataclass
class TrainSettings:
    """Everything that defines a run (recorded in the run folder's config.json; a rerun must match), checked
    when built. Not frozen: a CD Trainer fills `unet` in from its teacher, and callers read it there."""

    mode: str
    iters: int
    unet: dict
    batch_size: int = 64
    lr: float = 2e-4
    warmup: int = 100                 # linear lr warm-up iterations
    grad_clip: float = 1.0
    ema_rate: float = 0.999           # EMA of the weights that gets exported
    seed: int = 0
    # EDM
    p_mean: float = -1.2
    p_std: float = 1.2
    # CD
    teacher: str | None = None
    num_scales: int = 18
    target_ema: float = 0.95
    init_from_teacher: bool = True
    # CT
    start_scales: int = 10
    end_scales: int = 160
    ct_p_mean: float = -1.1
    ct_p_std: float = 2.0
    distance: str = "l2"
    # ECT (its noise levels are CT's log-normal, ct_p_mean and ct_p_std)
    ect_q: float = 2.0                # the gap t - r shrinks by this factor at each stage
    ect_stages: int = 8               # curriculum stages over the run: stage length d = ceil(iters / ect_stages)
    data: str = "fmnist"

    def __post_init__(self):
        check_finite(self, SETTINGS_FLAGS)
        check_choice(self, "mode", MODES)
        check_at_least(self, 1, ("iters", "batch_size"))
        check_at_least(self, 0, ("warmup", "grad_clip"))
        check_above(self, 0, ("lr", "p_std", "ct_p_std"), SETTINGS_FLAGS)
        check_fraction(self, ("ema_rate", "target_ema"))
        check_seed(self)
        check_choice(self, "distance", DISTANCES)
        if self.mode in ("cd", "ect") and not self.teacher:
            raise UserInputError(f"--mode {self.mode} needs --teacher (an EDM model.safetensors from "
                                 f"'cmboost train-cm --mode edm')")
        if self.ect_q <= 1:
            raise UserInputError(f"--ect-q {self.ect_q:g}: must be > 1 (the gap shrinks by it at each stage)")
        check_at_least(self, 1, ("ect_stages",))
        if self.mode == "cd" and self.num_scales < 2:
            raise UserInputError(f"--num-scales {self.num_scales}: needs at least 2")
        if self.mode == "ct" and not 2 <= self.start_scales <= self.end_scales:
            raise UserInputError(f"--start-scales {self.start_scales}, --end-scales {self.end_scales}: "
                                 f"need 2 <= start <= end")


# Fields no flag sets: messages name them as fields.
SETTINGS_FLAGS = {name: f"TrainSettings.{name}" for name in ("p_mean", "p_std", "ct_p_mean", "ct_p_std")}


# A mode's own default where the record's does not suit it (train-cm applies these when the flag is
# not given): CD starts from the teacher's weights and fine-tunes gently; CT compares with pseudo-Huber.
MODE_DEFAULTS = {"cd": {"lr": 4e-5}, "ct": {"distance": "pseudo-huber"},
                 "ect": {"lr": 1e-4, "distance": "pseudo-huber"}}


def mode_default(mode: str, name: str):
    """The default of TrainSettings field `name` for `mode`."""
    return MODE_DEFAULTS.get(mode, {}).get(name, field_default(TrainSettings, name))


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """How one invocation of the loop runs, not what it trains: a rerun may change any of these and
    still resume (train-cm's --save-every, --log-every and --max-minutes read their defaults here)."""

    save_every: int = 250             # iterations between saved states and exports
    log_every: int = 25               # iterations between log.jsonl records
    max_minutes: float | None = None  # wall-time budget of this invocation: past it, stop at the next
                                      # iteration boundary with a saved state and an exported model

    def __post_init__(self):
        check_finite(self)
        check_at_least(self, 1, ("save_every", "log_every"))
        check_above(self, 0, ("max_minutes",))


def mode_settings(mode: str, **fields) -> TrainSettings:
    """TrainSettings for `mode`, its learning rate and distance the mode's own (MODE_DEFAULTS) where the
    fields leave them out or None; `unet` empty unless given (the data, and a CD or ECT run's teacher,
    fill it in)."""
    for name in MODE_DEFAULTS.get(mode, {}).keys() | {"lr", "distance"}:
        if fields.get(name) is None:
            fields[name] = mode_default(mode, name)
    fields.setdefault("unet", {})
    return TrainSettings(mode=mode, **fields)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainCMRun:
    """One `cmboost train-cm`: what to train (settings, shape), where (run_dir), and how this invocation
    runs (loop, device, precision). A rerun with the same settings resumes."""

    run_dir: str
    settings: TrainSettings
    shape: UNetShape = UNetShape()
    loop: LoopSettings = LoopSettings()
    data_dir: str | None = None
    device: str = "auto"
    precision: str = "auto"
    progress: bool = True

    def __post_init__(self):
        for name, kind in (("settings", TrainSettings), ("shape", UNetShape), ("loop", LoopSettings)):
            if not isinstance(getattr(self, name), kind):
                raise TypeError(f"{name}: expected a {kind.__name__}, got {type(getattr(self, name)).__name__}")
