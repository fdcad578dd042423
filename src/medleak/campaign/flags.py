"""absl flags shared by every dataset script, with that dataset's paper defaults.

`define_flags(dataset)` defines the campaign flags, one flag per TrainConfig field (defaults from
`DATASET_DEFAULTS[dataset]` over TrainConfig's), and the dataset loader's `OPTIONS` as string
flags. The `*_from_flags` functions turn parsed flags into the plain objects `run_campaign` takes.
"""

import dataclasses
import sys

from absl import flags

from medleak.config import DATASET_DEFAULTS, CampaignConfig, TrainConfig
from medleak.errors import MedleakError

# TrainConfig field → help. The flag type follows the field's default value (img_size: "H,W").
TRAIN_FLAG_HELP = {
    "model": "architecture: small_cnn or wrn_<depth>_<width> (e.g. wrn_28_2)",
    "norm": "normalisation layer: group (DP-compatible) or batch",
    "img_size": "image size as H,W (e.g. 64,64); images are resized once into the cache",
    "epochs": "training epochs per shadow model",
    "batch_size": "training batch size",
    "learning_rate": "peak SGD learning rate (warm-up then cosine decay)",
    "weight_decay": "decoupled weight decay",
    "momentum": "SGD momentum",
    "nesterov": "use Nesterov momentum",
    "warmup_epochs": "linear learning-rate warm-up, in epochs",
    "ema_decay": "EMA of the weights used for evaluation (0 disables)",
    "grad_accum": "gradient accumulation steps per update",
    "augment": "training augmentation preset: none, trivial, weak, medium, strong",
    "eval_views": "views per training record at inference (view 0 clean, then flips/shifts)",
    "compute_dtype": "float32 or bfloat16 activations (parameters stay float32)",
    "epsilon": "DP-SGD target epsilon (inf = no differential privacy)",
    "delta": "DP-SGD delta (0 = 1/number of training units)",
    "clip_norm": "DP-SGD per-unit gradient clipping norm",
    "dp_unit": "DP unit: record (one image) or patient (all of a patient's images)",
}

# Campaign flags: name → (default, help). The flag type follows the default.
CAMPAIGN_FLAGS = {
    "n_runs": (200, "number of shadow models in the campaign"),
    "subset_ratio": (0.5, "share of runs each patient is IN for"),
    "seed": (0, "campaign seed: the IN/OUT plan and every run's training seed derive from it"),
    "max_attempts": (3, "claims of one run (failures, lost workers) before it is reported failed"),
    "lease_seconds": (300.0, "a claimed run is re-taken by another worker when its lease is not "
                             "renewed for this long (renewed every third of it while training)"),
}


def define_flags(dataset: str, flag_values=flags.FLAGS, help_module=None) -> None:
    """Defines all flags of a dataset script in `flag_values`.

    They are listed by the script's `--help` (as flags of `help_module`, default: the script).
    """
    from medleak.data_utils.datasets import dataset_options

    if dataset not in DATASET_DEFAULTS:
        raise MedleakError(f"unknown dataset {dataset!r}; choose one of {sorted(DATASET_DEFAULTS)}")
    module_name = help_module or sys.argv[0]

    def define(name, default, help_text, kind=None):
        kind = kind or _kind(default)
        kind(name, default, help_text, flag_values=flag_values, module_name=module_name)

    define("data_root", f"./data/{dataset}", "the downloaded dataset, in its official layout")
    define("logdir", f"./logs/{dataset}", "campaign directory shared by all workers")
    define("cache_dir", None, "image cache folder (default $MEDLEAK_CACHE_DIR or ~/.cache/medleak)",
           flags.DEFINE_string)
    define("cache_workers", None, "processes decoding images when the cache is built", flags.DEFINE_integer)
    define("skip_unreadable", False, "leave out (and list) records whose image is missing or cannot be "
           "decoded, instead of stopping with an error")
    define("workers_per_device", 1, "worker processes sharing one GPU (each takes that share of its memory)")
    define("eval_only", False, "train one model on the whole training split and report its test metrics "
           "(written to <logdir>/eval_only)")
    for name, (default, help_text) in CAMPAIGN_FLAGS.items():
        define(name, default, help_text)
    defaults = default_train_config(dataset)
    for field in dataclasses.fields(TrainConfig):
        value = getattr(defaults, field.name)
        if field.name == "img_size":
            value = ",".join(str(v) for v in value)
        define(field.name, value, TRAIN_FLAG_HELP[field.name])
    for option, (default, help_text) in dataset_options(dataset).items():
        if option in flag_values:
            raise MedleakError(f"{dataset}: loader option {option!r} clashes with a campaign flag; rename it")
        define(option, None if default is None else str(default), f"[{dataset} loader] {help_text}",
               flags.DEFINE_string)


def _kind(default):
    """The absl DEFINE_* function for a default value's type."""
    if isinstance(default, bool):
        return flags.DEFINE_bool
    if isinstance(default, int):
        return flags.DEFINE_integer
    if isinstance(default, float):
        return flags.DEFINE_float
    return flags.DEFINE_string


def default_train_config(dataset: str) -> TrainConfig:
    """TrainConfig with the paper's defaults for `dataset`."""
    return TrainConfig(**DATASET_DEFAULTS[dataset])


def parse_img_size(text: str) -> tuple:
    """'64,64' → (64, 64); a single number means a square image."""
    parts = [p.strip() for p in str(text).replace("x", ",").split(",") if p.strip()]
    try:
        size = tuple(int(p) for p in parts)
    except ValueError:
        size = ()
    if len(size) == 1:
        size = size * 2
    if len(size) != 2 or min(size) < 4:
        raise MedleakError(f"--img_size={text!r}: give height,width in pixels, e.g. --img_size=64,64")
    return size


def train_config_from_flags(flag_values=flags.FLAGS) -> TrainConfig:
    """The TrainConfig the parsed flags describe."""
    values = {}
    for field in dataclasses.fields(TrainConfig):
        value = flag_values[field.name].value
        values[field.name] = parse_img_size(value) if field.name == "img_size" else value
    config = TrainConfig(**values)
    for name in ("epochs", "batch_size", "eval_views", "grad_accum"):
        if getattr(config, name) < 1:
            raise MedleakError(f"--{name} must be at least 1, got {getattr(config, name)}")
    if config.learning_rate <= 0:
        raise MedleakError(f"--learning_rate must be positive, got {config.learning_rate}")
    if not 0.0 <= config.ema_decay < 1.0:
        raise MedleakError(f"--ema_decay must be in [0, 1), got {config.ema_decay}")
    if config.dp_unit not in ("record", "patient"):
        raise MedleakError(f"--dp_unit must be record or patient, got {config.dp_unit!r}")
    if config.epsilon <= 0:
        raise MedleakError(f"--epsilon must be positive (inf disables DP), got {config.epsilon}")
    # Names are checked now, before the first worker writes them into plan.json (a logdir whose plan
    # holds a bad name would refuse the corrected command as a different config).
    from medleak.train_utils.augment import check_preset
    from medleak.train_utils.models import create_model
    from medleak.train_utils.training import COMPUTE_DTYPES

    check_preset(config.augment)
    create_model(config.model, 1, norm=config.norm)  # a flax module definition: nothing is compiled
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise MedleakError(f"--compute_dtype={config.compute_dtype!r}: use one of {', '.join(COMPUTE_DTYPES)}")
    if config.dp:
        from medleak.dp.estimator import validate_dp_config

        validate_dp_config(config)
    return config


def campaign_config_from_flags(flag_values=flags.FLAGS) -> CampaignConfig:
    """The CampaignConfig the parsed flags describe."""
    return CampaignConfig(**{name: flag_values[name].value for name in CAMPAIGN_FLAGS})


def loader_options_from_flags(dataset: str, flag_values=flags.FLAGS) -> dict:
    """{option: value} of the dataset loader's options that are set."""
    from medleak.data_utils.datasets import dataset_options

    return {option: flag_values[option].value for option in dataset_options(dataset)
            if flag_values[option].value is not None}
