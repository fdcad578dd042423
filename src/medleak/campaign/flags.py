"""absl flags shared by every dataset script, with that dataset's paper defaults.

`define_flags(dataset)` defines one flag per CampaignConfig field and per TrainConfig field (their
defaults from the dataclasses and `config.DATASET_DEFAULTS[dataset]`, the one table of the paper's
defaults), the worker's own flags, and the dataset loader's `OPTIONS` as string flags. The
`*_from_flags` functions turn parsed flags into the plain objects `run_campaign` takes.
"""

import dataclasses
import sys

from absl import flags

from medleak.config import AUGMENT_PRESETS, CampaignConfig, TrainConfig, dataset_train_config
from medleak.errors import MedleakError

# TrainConfig field → help. The flag type follows the field's default value (img_size: "H,W").
TRAIN_FLAG_HELP = {
    "model": "architecture: small_cnn, resnet9 (DP_CXR; 64x64 images and up) or wrn_<depth>_<width> (e.g. wrn_28_2)",
    "norm": "normalisation layer: group (DP-compatible) or batch",
    "activation": "resnet9's activation: relu or mish (small_cnn and wrn_* use LeakyReLU(0.1))",
    "img_size": "image size as H,W (e.g. 64,64); images are resized once into the cache",
    "epochs": "training epochs per shadow model",
    "batch_size": "examples per optimiser update, computed in --grad_accum micro-batches of "
                  "batch_size/grad_accum (the paper's 512 x 2 is --batch_size=1024 --grad_accum=2)",
    "grad_accum": "micro-batches per update (gradients summed; only memory use changes)",
    "learning_rate": "peak SGD learning rate (warm-up then cosine decay to 0)",
    "weight_decay": "decoupled weight decay as in Keras SGD (params -= lr * weight_decay * params; kernels only)",
    "momentum": "SGD momentum",
    "nesterov": "use Nesterov momentum",
    "warmup": "linear learning-rate warm-up over this fraction of all training steps, in [0, 1)",
    "ema_decay": "EMA of the weights used for evaluation (0 disables)",
    "augment": f"training augmentation preset: {', '.join(AUGMENT_PRESETS)} (docs/DATASETS.md)",
    "eval_views": "views per training record at inference (view 0 clean, then flips/shifts)",
    "compute_dtype": "activations' dtype: auto (bfloat16 on GPU/TPU, float32 on CPU; resolved once, when the "
                     "plan is made, and recorded in plan.json), float32 or bfloat16 (parameters stay float32)",
    "epsilon": "DP-SGD target epsilon (inf = no differential privacy)",
    "delta": "DP-SGD delta (0 = 1/(n(1 + ln n)) for the n training units, strictly below 1/n; fixed in plan.json)",
    "clip_norm": "DP-SGD per-unit gradient clipping norm",
    "dp_unit": "DP unit: record (one image) or patient (all of a patient's images)",
    "optimizer": "sgd (with --momentum/--nesterov), adam or nadam (DP_CXR: nadam, --learning_rate=2e-4 "
                 "--weight_decay=0); the same warm-up/cosine schedule and decoupled weight decay for all",
    "init_from": "start from a model saved by medleak (a …/model directory of --eval_only or --save_weights); "
                 "labels it shares keep their head rows, new ones get a fresh head (docs/TRANSFER.md)",
    "finetune": "with --init_from: train all parameters, or the classification head only (the rest frozen)",
    "pos_weight": "BCE positive-class weights: none, auto (n_negative/n_positive per label over the WHOLE "
                  "training table, treated as public and recorded in plan.json) or w1,w2,... one per label",
}

# CampaignConfig field → help. The flag type follows the field's default value.
CAMPAIGN_FLAG_HELP = {
    "n_runs": "number of shadow models in the campaign",
    "subset_ratio": "share of runs each patient is IN for",
    "seed": "campaign seed: the IN/OUT plan and every run's training seed derive from it",
    "max_attempts": "claims of one run (failures, lost workers) before it is reported failed",
    "lease_seconds": "a claimed run is re-taken by another worker when its lease is not renewed for this "
                     "long (renewed every third of it while training)",
    "checkpoint_minutes": "save a training run's state at the first epoch boundary after this many minutes "
                          "(into <logdir>/checkpoints/, deleted when the run is published), so a run whose "
                          "worker is lost resumes there; 0 disables",
    "save_weights": "also write every run's final (EMA) weights and config into runs/run_NNNN/model/ "
                    "(docs/RUNDIR.md; --eval_only always writes its model)",
}


def define_flags(dataset: str, flag_values=flags.FLAGS, help_module=None) -> None:
    """Defines all flags of a dataset script in `flag_values`.

    They are listed by the script's `--help` (as flags of `help_module`, default: the script).
    """
    from medleak.data_utils.datasets import dataset_options

    train_defaults = dataset_train_config(dataset)
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
    define("models_per_program", 0, "runs this worker claims and trains together in one device program, "
           "sharded over its devices (0: the backend's default, 1 on CPU; the GPU default is unmeasured, "
           "see bench/RESULTS.md); each model's result is that of training it alone")
    define("external_test", "", "also score every run on other datasets' test splits over the labels they share: "
           "NAME:ROOT[,NAME:ROOT...] (e.g. mimic:/data/mimic); metrics.json's external_test")
    define("eval_only", False, "train one model on the whole training split and report its test metrics "
           "(written to <logdir>/eval_only)")
    for defaults, help_texts in ((CampaignConfig(), CAMPAIGN_FLAG_HELP), (train_defaults, TRAIN_FLAG_HELP)):
        for field in dataclasses.fields(defaults):
            value = getattr(defaults, field.name)
            if field.name == "img_size":
                value = ",".join(str(v) for v in value)
            define(field.name, value, help_texts[field.name])
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
    # Checked now, before the first worker writes them into plan.json (a logdir whose plan holds a
    # bad value would refuse the corrected command as a different config).
    config = TrainConfig(**values).validate()
    if config.dp:
        from medleak.dp.estimator import validate_dp_config

        validate_dp_config(config)
    return config


def campaign_config_from_flags(flag_values=flags.FLAGS) -> CampaignConfig:
    """The CampaignConfig the parsed flags describe."""
    return CampaignConfig(**{field.name: flag_values[field.name].value
                             for field in dataclasses.fields(CampaignConfig)})


def loader_options_from_flags(dataset: str, flag_values=flags.FLAGS) -> dict:
    """{option: value} of the dataset loader's options that are set."""
    from medleak.data_utils.datasets import dataset_options

    return {option: flag_values[option].value for option in dataset_options(dataset)
            if flag_values[option].value is not None}
