"""Training and campaign configuration: plain dataclasses that round-trip through JSON.

`TrainConfig` is everything that determines what one shadow model is (stored in plan.json; a worker
whose config differs from the stored one is refused). `CampaignConfig` is how the campaign is run.
`DATASET_DEFAULTS` is the one table of the paper's per-dataset defaults (SPEC.md): the dataset
scripts' flags, plan.json and docs/DATASETS.md (`defaults_markdown`) all read it.

This module sits at the bottom of the stack with `errors`: it also holds the vocabulary a config is
checked against (model names, norms, augmentation presets, compute dtypes, DP units), so that
`TrainConfig.validate()` needs nothing from the modules that build models or train them.
"""

import dataclasses
import math
import re

from medleak.errors import MedleakError

NORMS = ("group", "batch")
ACTIVATIONS = ("relu", "mish")  # resnet9's (small_cnn and the WRN use LeakyReLU(0.1))
# Smallest image side a model takes: resnet9 downsamples 32x (stem, max-pool, three strided stages).
MIN_IMAGE_SIDE = {"resnet9": 64}
DP_UNITS = ("record", "patient")
OPTIMIZERS = ("sgd", "adam", "nadam")  # train_utils/optim.py
FINETUNE = ("all", "head")  # with --init_from: train every parameter, or the classification head only
# "auto" is resolved once, when a campaign's plan is made (train_utils.device.resolve_compute_dtype):
# bfloat16 on accelerators that support it, float32 on CPU; plan.json records the resolved value.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
# Augmentation preset -> on-device operations, applied in this order (train_utils/augment.py).
AUGMENT_PRESETS = {
    "none": (),
    "trivial": ("flip",),
    "weak": ("flip", "shift"),
    "medium": ("flip", "shift", "rotate"),
    "strong": ("flip", "shift", "rotate", "brightness_contrast"),
    # EMBED mammograms (paper): random rotation, contrast and brightness; no flip or shift.
    "rotate_contrast_brightness": ("rotate", "brightness_contrast"),
}
_WRN_NAME = re.compile(r"wrn_(\d+)_(\d+)")


def model_architecture(name: str) -> tuple:
    """('small_cnn',), ('resnet9',) or ('wrn', depth, width) for a model name; MedleakError naming
    --model otherwise."""
    if name in ("small_cnn", "resnet9"):
        return (name,)
    match = _WRN_NAME.fullmatch(str(name))
    if match:
        depth, width = int(match.group(1)), int(match.group(2))
        if depth < 10 or (depth - 4) % 6 != 0 or width < 1:
            raise MedleakError(
                f"--model={name!r}: WRN depth must be 6n+4 with n >= 1 (e.g. 10, 16, 22, 28) and width >= 1")
        return ("wrn", depth, width)
    raise MedleakError(f"unknown --model={name!r}: use small_cnn, resnet9 or wrn_<depth>_<width> such as wrn_28_2")


def check_model(model: str, norm: str, activation: str) -> tuple:
    """`model_architecture(model)` after checking that `norm` and `activation` go with it."""
    architecture = model_architecture(model)
    check_choice("norm", norm, NORMS)
    check_choice("activation", activation, ACTIVATIONS)
    if model == "resnet9" and norm != "group":
        raise MedleakError("--model=resnet9 uses GroupNorm(32) only: drop --norm=batch")
    if activation != "relu" and model != "resnet9":
        raise MedleakError(f"--activation={activation} applies to --model=resnet9 only ({model} uses LeakyReLU(0.1))")
    return architecture


def check_image_size(model: str, img_size) -> None:
    """MedleakError naming --img_size when `model` needs larger images (MIN_IMAGE_SIDE)."""
    side = MIN_IMAGE_SIDE.get(model)
    if side is not None and min(img_size) < side:
        raise MedleakError(f"--img_size={','.join(str(int(v)) for v in img_size)} is too small for "
                           f"--model={model}: give at least {side},{side}")


def check_choice(flag: str, value, choices) -> None:
    """MedleakError naming `--flag` unless `value` is one of `choices`."""
    if value not in choices:
        raise MedleakError(f"--{flag}={value!r} is not supported: use one of {', '.join(choices)}")


def parse_pos_weight(text) -> tuple | str:
    """--pos_weight as "none", "auto" or a tuple of positive floats; MedleakError naming the flag."""
    text = str(text).strip()
    if text in ("none", "auto"):
        return text
    try:
        weights = tuple(float(part) for part in text.split(","))
    except ValueError:
        weights = ()
    if not weights or not all(math.isfinite(w) and w > 0 for w in weights):
        raise MedleakError(f"--pos_weight={text!r}: give none, auto, or one positive weight per label "
                           "separated by commas (e.g. 2.5,1,4)")
    return weights


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "wrn_28_2"
    norm: str = "group"  # "group" (DP-compatible) or "batch"
    activation: str = "relu"  # resnet9's: "relu" or "mish"
    img_size: tuple = (64, 64)  # (height, width)
    epochs: int = 10
    # Examples per optimiser update, computed in `grad_accum` micro-batches of batch_size / grad_accum
    # (the paper's "512 x 2" is batch_size=1024, grad_accum=2).
    batch_size: int = 256
    grad_accum: int = 1
    learning_rate: float = 0.1
    weight_decay: float = 1e-4  # decoupled (Keras SGD): params -= lr * weight_decay * params
    momentum: float = 0.9
    nesterov: bool = False
    warmup: float = 0.05  # linear warm-up over this fraction of all steps, then cosine decay
    ema_decay: float = 0.0  # 0 disables EMA; evaluation uses EMA weights when enabled
    augment: str = "weak"  # a key of AUGMENT_PRESETS
    eval_views: int = 16
    compute_dtype: str = "auto"  # activations; parameters stay float32
    # Differential privacy (epsilon = inf disables DP-SGD).
    epsilon: float = float("inf")
    delta: float = 0.0  # 0 → dp.accounting.default_delta(n units) = 1/(n(1 + ln n)), fixed when the plan is made
    clip_norm: float = 1.0
    dp_unit: str = "record"  # "record" or "patient"
    optimizer: str = "sgd"  # "sgd" (momentum, nesterov), "adam" or "nadam" (train_utils/optim.py)
    # A model saved by medleak (…/model) to start from; "" starts from a random initialisation.
    init_from: str = ""
    finetune: str = "all"  # with init_from: "all" parameters or the "head" only
    # BCE positive-class weights (multi-label): "none", "auto" (n_negative / n_positive per label of
    # the WHOLE training table, resolved when the plan is made) or "w1,w2,…" one per label.
    pos_weight: str = "none"

    @property
    def dp(self) -> bool:
        return self.epsilon != float("inf")

    @property
    def micro_batch_size(self) -> int:
        """Examples per forward/backward pass."""
        return self.batch_size // self.grad_accum

    def validate(self) -> "TrainConfig":
        """Returns self, or raises a one-line MedleakError naming the bad flag (`--name`).

        Called when flags are parsed (before a plan records the config) and by the Trainer.
        The DP fields are checked with the DP code (`medleak.dp.estimator.validate_dp_config`).
        """
        for name in ("epochs", "batch_size", "eval_views", "grad_accum"):
            if getattr(self, name) < 1:
                raise MedleakError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise MedleakError(f"--grad_accum={self.grad_accum} must divide --batch_size={self.batch_size} "
                               "(batch_size is the examples per update, split into grad_accum micro-batches)")
        if len(self.img_size) != 2 or min(self.img_size) < 4:
            raise MedleakError(f"--img_size={self.img_size}: give height,width in pixels (at least 4)")
        if not self.learning_rate > 0:
            raise MedleakError(f"--learning_rate must be positive, got {self.learning_rate}")
        if not self.weight_decay >= 0:
            raise MedleakError(f"--weight_decay must be >= 0, got {self.weight_decay}")
        if not 0.0 <= self.momentum < 1.0:
            raise MedleakError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not 0.0 <= self.warmup < 1.0:
            raise MedleakError(f"--warmup is a fraction of all training steps in [0, 1), got {self.warmup}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise MedleakError(f"--ema_decay must be in [0, 1) (0 disables the EMA), got {self.ema_decay}")
        check_model(self.model, self.norm, self.activation)
        check_image_size(self.model, self.img_size)
        check_choice("augment", self.augment, tuple(AUGMENT_PRESETS))
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("dp_unit", self.dp_unit, DP_UNITS)
        check_choice("optimizer", self.optimizer, OPTIMIZERS)
        check_choice("finetune", self.finetune, FINETUNE)
        if self.nesterov and self.optimizer != "sgd":
            raise MedleakError("--nesterov applies to --optimizer=sgd only (nadam is Adam with Nesterov momentum)")
        if self.finetune != "all" and not self.init_from:
            raise MedleakError(f"--finetune={self.finetune} needs --init_from=DIR (a model saved by medleak)")
        parse_pos_weight(self.pos_weight)
        return self

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["img_size"] = list(self.img_size)
        d["epsilon"] = "inf" if self.epsilon == float("inf") else self.epsilon
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        d["img_size"] = tuple(d["img_size"])
        d["epsilon"] = float(d["epsilon"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclasses.dataclass(frozen=True)
class CampaignConfig:
    n_runs: int = 200
    subset_ratio: float = 0.5
    seed: int = 0
    max_attempts: int = 3
    lease_seconds: float = 300.0
    # Least minutes between two checkpoints of a training run (0: none). A save of a WRN-28-2 takes
    # well under a second (bench/campaign.py), so 10 minutes keeps the overhead far below 2 %.
    checkpoint_minutes: float = 10.0
    save_weights: bool = False  # also keep every run's weights (runs/run_NNNN/model/)

    # The fields that decide which models are trained (stored in plan.json); the others only say
    # how workers share the runs and may differ between workers.
    PLANNED = ("n_runs", "subset_ratio", "seed")

    def planned(self) -> dict:
        return {name: getattr(self, name) for name in self.PLANNED}


# The paper's per-dataset defaults (SPEC.md "Per-dataset defaults", from the paper's own scripts):
# WRN-28-2, SGD momentum 0.9 with decoupled weight decay, EMA, cosine schedule after a warm-up
# over a fraction of all steps, bf16 where supported, 16 eval views; every column of the paper's
# table is written out for every dataset. Fields not listed take TrainConfig's defaults.
DATASET_DEFAULTS = {
    "chexpert": dict(epochs=60, learning_rate=1.0, weight_decay=1e-4, batch_size=1024, grad_accum=2,
                     ema_decay=0.9995, warmup=0.05, img_size=(64, 64), augment="weak"),
    "mimic": dict(epochs=60, learning_rate=0.25, weight_decay=1e-3, batch_size=1024, grad_accum=2,
                  ema_decay=0.95, warmup=0.2, img_size=(64, 64), augment="weak"),
    "embed": dict(epochs=30, learning_rate=0.1, weight_decay=1e-8, batch_size=1024, grad_accum=2,
                  ema_decay=0.995, warmup=0.1, img_size=(64, 48), augment="rotate_contrast_brightness"),
    "fairvision": dict(epochs=100, learning_rate=1e-4, weight_decay=1e-6, batch_size=256, grad_accum=1,
                       ema_decay=0.99, warmup=0.1, img_size=(64, 64), augment="weak"),
    "fitzpatrick": dict(epochs=100, learning_rate=5e-3, weight_decay=1e-4, batch_size=256, grad_accum=1,
                        ema_decay=0.99, warmup=0.05, img_size=(64, 64), augment="weak"),
    # Not in the paper (issue 15): CheXpert's row, the chest X-ray dataset closest in size and kind.
    "chestxray14": dict(epochs=60, learning_rate=1.0, weight_decay=1e-4, batch_size=1024, grad_accum=2,
                        ema_decay=0.9995, warmup=0.05, img_size=(64, 64), augment="weak"),
}


def dataset_train_config(dataset: str) -> TrainConfig:
    """TrainConfig with the paper's defaults for `dataset`."""
    if dataset not in DATASET_DEFAULTS:
        raise MedleakError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASET_DEFAULTS)}")
    return TrainConfig(**DATASET_DEFAULTS[dataset])


def defaults_markdown() -> str:
    """The defaults table of docs/DATASETS.md (a test keeps the doc equal to this)."""
    campaign = CampaignConfig()
    lines = [
        "| dataset | epochs | lr | weight decay | batch × grad-accum | EMA decay | warm-up | image | augmentation |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for dataset in DATASET_DEFAULTS:
        c = dataset_train_config(dataset)
        batch = f"{c.micro_batch_size} × {c.grad_accum}" if c.grad_accum > 1 else f"{c.batch_size}"
        batch += f" (`--batch_size={c.batch_size} --grad_accum={c.grad_accum}`)"
        lines.append(f"| {dataset} | {c.epochs} | {_number(c.learning_rate)} | {_number(c.weight_decay)} | {batch} | "
                     f"{c.ema_decay:g} | {_percent(c.warmup)} of steps | {c.img_size[0]}×{c.img_size[1]} | "
                     f"`{c.augment}` |")
    common = TrainConfig()
    lines.append("")
    lines.append(f"All datasets: `--model={common.model}` (`--norm={common.norm}`), SGD momentum {common.momentum}, "
                 f"`--compute_dtype={common.compute_dtype}` (bfloat16 on GPU/TPU, float32 on CPU), "
                 f"{common.eval_views} eval views, `--n_runs={campaign.n_runs}`, "
                 f"`--subset_ratio={campaign.subset_ratio}`.")
    return "\n".join(lines)


def _number(value: float) -> str:
    """1.0 -> '1', 0.25 -> '0.25', 0.0001 -> '1e-4' (as the paper's table writes them)."""
    if value and abs(value) < 0.01:
        mantissa, exponent = f"{value:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    return f"{value:g}"


def _percent(fraction: float) -> str:
    value = fraction * 100
    return f"{value:.0f} %" if math.isclose(value, round(value)) else f"{value:g} %"


def runs_in_per_patient(n_runs: int, subset_ratio: float) -> int:
    """How many runs every patient is IN for: subset_ratio * n_runs rounded half up (the plan's rule,
    also used by the audit's run planner)."""
    return int(math.floor(subset_ratio * n_runs + 0.5))
