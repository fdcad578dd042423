"""The dataset scripts' defaults are the paper's table (issue 10, SPEC.md), read as a user sees them.

The paper's table is written out literally below, not imported: the scripts' `--helpfull` output
(the real flag definitions of each script) must reproduce it. The docs are checked against the one
table in medleak.config that the flags are built from.
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from medleak.config import AUGMENT_PRESETS, defaults_markdown

REPO = Path(__file__).resolve().parent.parent

# SPEC.md "Per-dataset defaults": epochs, lr, weight decay, batch x grad-accum, EMA decay, warm-up
# (fraction of all steps), image (height x width).
PAPER = {
    "chexpert": (60, 1.0, 1e-4, (512, 2), 0.9995, 0.05, (64, 64)),
    "mimic": (60, 0.25, 1e-3, (512, 2), 0.95, 0.20, (64, 64)),
    "embed": (30, 0.1, 1e-8, (512, 2), 0.995, 0.10, (64, 48)),
    "fairvision": (100, 1e-4, 1e-6, (256, 1), 0.99, 0.10, (64, 64)),
    "fitzpatrick": (100, 5e-3, 1e-4, (256, 1), 0.99, 0.05, (64, 64)),
}
# For every dataset: WRN-28-2, SGD momentum 0.9, 200 runs, 50 % subsets, 16 views, mixed precision
# where the accelerator has it ("auto": bfloat16 on GPU/TPU, float32 on CPU).
COMMON = {"model": "wrn_28_2", "momentum": "0.9", "n_runs": "200", "subset_ratio": "0.5",
          "eval_views": "16", "compute_dtype": "auto"}
_FLAG = re.compile(r"^\s+--(?:\[no\])?(\w+):")
_DEFAULT = re.compile(r"^\s+\(default: '(.*)'\)\s*$")


def script_defaults(dataset: str) -> dict:
    """{flag: default as text} from `python <dataset>.py --helpfull`."""
    done = subprocess.run([sys.executable, f"{dataset}.py", "--helpfull"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode in (0, 1) and "--epochs" in done.stdout, done.stderr  # absl's --help exits 1
    defaults, flag = {}, None
    for line in done.stdout.splitlines():
        if match := _FLAG.match(line):
            flag = match.group(1)
        elif (match := _DEFAULT.match(line)) and flag is not None:
            defaults.setdefault(flag, match.group(1))
    return defaults


@pytest.fixture(scope="module", params=sorted(PAPER))
def dataset_and_defaults(request):
    return request.param, script_defaults(request.param)


def test_script_defaults_are_the_papers_table(dataset_and_defaults):
    dataset, defaults = dataset_and_defaults
    epochs, lr, weight_decay, (micro_batch, accumulation), ema, warmup, image = PAPER[dataset]
    assert int(defaults["epochs"]) == epochs
    assert float(defaults["learning_rate"]) == pytest.approx(lr, rel=1e-12)
    assert float(defaults["weight_decay"]) == pytest.approx(weight_decay, rel=1e-12)
    # batch_size is the examples per update, computed in grad_accum micro-batches
    assert int(defaults["grad_accum"]) == accumulation
    assert int(defaults["batch_size"]) == micro_batch * accumulation
    assert float(defaults["ema_decay"]) == pytest.approx(ema, rel=1e-12)
    assert float(defaults["warmup"]) == pytest.approx(warmup, rel=1e-12)
    assert tuple(int(v) for v in defaults["img_size"].split(",")) == image
    for flag, value in COMMON.items():
        assert defaults[flag] == value, flag
    assert "warmup_epochs" not in defaults


def test_embed_augments_by_rotation_contrast_and_brightness(dataset_and_defaults):
    dataset, defaults = dataset_and_defaults
    operations = AUGMENT_PRESETS[defaults["augment"]]
    if dataset == "embed":
        assert set(operations) == {"rotate", "brightness_contrast"}
    else:
        assert "flip" in operations


def test_docs_show_the_one_defaults_table():
    text = (REPO / "docs" / "DATASETS.md").read_text()
    shown = text.split("<!-- defaults:begin -->\n")[1].split("\n<!-- defaults:end -->")[0]
    assert shown == defaults_markdown()


def test_readme_flags_table_names_only_real_flags():
    from absl import flags

    from medleak.campaign.flags import define_flags

    flag_values = flags.FlagValues()
    define_flags("chexpert", flag_values, help_module="test")
    readme = (REPO / "README.md").read_text()
    table = readme.split("| flag | meaning |")[1].split("\n\n")[0]
    named = set(re.findall(r"`--(\w+)", table))
    assert {"warmup", "grad_accum", "compute_dtype", "weight_decay", "ema_decay"} <= named
    assert named <= set(flag_values), named - set(flag_values)
