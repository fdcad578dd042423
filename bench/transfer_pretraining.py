"""Benchmark: DP fine-tuning from pretrained weights vs DP training from scratch, same ε (issue 15).

Synthetic data where pretraining helps: 16x16 noise images with a bright square in grid cell k for
each positive label k (tests/layouts.signal_image). The public dataset A (`--n_public` images,
6 labels: one per cell) pretrains a small_cnn without DP and is saved as medleak saves models; the
private dataset B (`--n_private` images, 3 labels with NEW names — cells 0, 2 and 4, at 0.6 of the
contrast — so the head is re-initialised) is trained with record-level DP-SGD at each ε, either
from scratch or with `--init_from` (all parameters, and head only). Test macro AUROC on B's test
split (1000 images), mean ± sd over `--seeds` seeds (the DP noise and the initialisation).

    python bench/transfer_pretraining.py [--seeds 0 1 2] [--epsilons 1 8]
"""

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from medleak.config import TrainConfig  # noqa: E402
from medleak.dp.estimator import DpTraining  # noqa: E402
from medleak.train_utils import finetune, training  # noqa: E402
from medleak.train_utils.metrics import macro_auroc  # noqa: E402
from medleak.train_utils.saved_model import save_model  # noqa: E402
from tests.layouts import signal_image  # noqa: E402

SIZE, SLOTS = (16, 16), 6
PRIVATE_CELLS = (0, 2, 4)


def make_set(n, cells, seed, contrast=1.0):
    rng = np.random.default_rng(seed)
    labels = rng.random((n, len(cells))) < 0.3
    images = np.stack([signal_image(rng, SIZE, [cells[c] for c in np.flatnonzero(row)], SLOTS) for row in labels])
    images = (90 + (images.astype(np.float32) - 90) * contrast).clip(0, 255).astype(np.uint8)
    return images[..., None], labels.astype(np.float32)


def train(config, images, labels, seed, initial=None):
    n = len(images)
    kwargs = {} if initial is None else {"initial_variables": initial}
    if config.dp:
        dp = DpTraining(config, np.array([f"r{i}" for i in range(n)]), training.steps_per_epoch(n, config.batch_size))
        kwargs.update(schedule_fn=dp.schedule_fn, gradient_estimator=dp.gradient_estimator)
    trainer = training.Trainer(config, images, labels, "multilabel", **kwargs)
    return trainer, trainer.train(np.arange(n), seed=seed, progress=False)


def test_auroc(trainer, model, images, labels):
    import jax

    from medleak.train_utils import inference

    on_device = jax.device_put(images)
    program = inference.compile_view_logits(trainer.model, model.eval_variables, on_device, 250, 1, "none")
    logits = inference.view_logits(program, model.eval_variables, on_device)[:, 0]
    return macro_auroc(logits, labels > 0.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 8.0])
    parser.add_argument("--n_public", type=int, default=2000)
    parser.add_argument("--n_private", type=int, default=256)
    args = parser.parse_args()
    started = time.time()
    base = TrainConfig(model="small_cnn", img_size=SIZE, augment="none", eval_views=1, compute_dtype="float32",
                       learning_rate=0.1, weight_decay=0.0, warmup=0.0, ema_decay=0.0)
    public_images, public_labels = make_set(args.n_public, tuple(range(SLOTS)), seed=100)
    pre_config = dataclasses.replace(base, epochs=4, batch_size=64)
    pre_trainer, pretrained = train(pre_config, public_images, public_labels, seed=0)
    directory = Path(tempfile.mkdtemp()) / "model"
    save_model(directory, pretrained.eval_variables, config=pre_trainer.config, n_classes=SLOTS, task="multilabel",
               channels=1, label_names=[f"public_{k}" for k in range(SLOTS)],
               trained_on=finetune.training_record("public", [f"a{i}" for i in range(args.n_public)]))
    private_images, private_labels = make_set(args.n_private, PRIVATE_CELLS, seed=200, contrast=0.6)
    test_images, test_labels = make_set(1000, PRIVATE_CELLS, seed=300, contrast=0.6)
    names = [f"private_{k}" for k in range(len(PRIVATE_CELLS))]
    print(f"pretrained on {args.n_public} public images ({time.time() - started:.0f} s); "
          f"private {args.n_private} train / 1000 test, seeds {args.seeds}")
    print("| ε | from scratch | pretrained, fine-tune all | pretrained, head only |")
    print("|---|---|---|---|")
    for epsilon in args.epsilons:
        cells = []
        for start in ("scratch", "all", "head"):
            aurocs = []
            for seed in args.seeds:
                config = dataclasses.replace(base, epochs=10, batch_size=64, epsilon=epsilon, delta=1e-5, clip_norm=1.0)
                initial = None
                if start != "scratch":
                    config = dataclasses.replace(config, init_from=str(directory), finetune=start)
                    initial = finetune.pretrained_initializer(config, training.config_model(config, len(names)),
                                                              len(names), names)
                trainer, model = train(config, private_images, private_labels, seed, initial)
                aurocs.append(test_auroc(trainer, model, test_images, test_labels))
            cells.append(f"{np.mean(aurocs):.3f} ± {np.std(aurocs):.3f}")
        print(f"| {epsilon:g} | " + " | ".join(cells) + " |", flush=True)
    print(f"total {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
