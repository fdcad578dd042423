"""The campaign entry point shared by the per-dataset scripts (fitzpatrick.py, chexpert.py, …).

One worker process: load the dataset's records table → create or check the logdir's plan under the
queue lock → claim runs until none is left; for each run train a model on its IN patients' records,
infer every training record under V views and the test set, and write the run directory atomically.
Images are decoded into the cache and the Trainer is built (compiled) only when the first run is
claimed, so a worker started on a finished campaign exits in seconds. Start as many workers as you
like, on as many machines as share the logdir.
"""

import dataclasses
import functools
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np

from medleak import rundir
from medleak.campaign import plan
from medleak.campaign.workqueue import WorkQueue, work_loop
from medleak.config import TrainConfig
from medleak.errors import MedleakError

EVAL_ONLY_DIR = "eval_only"


def _log(message: str) -> None:
    print(message, flush=True)


def progress_lines(log, seed: int, images_per_step: int):
    """The Trainer's `log_progress`: a bar draws progress on a terminal; elsewhere, log lines."""
    if sys.stderr.isatty():
        return None
    from medleak.campaign.progress import ProgressLines

    return ProgressLines(log, f"training (seed {seed})", images_per_step)


def prepare_campaign(queue: WorkQueue, document: dict, train_table, test_table, log=_log, requested=None,
                     check_trainable=True):
    """Creates the logdir's plan (first worker) or checks it (later ones), all under the queue lock.

    `requested`: the worker's TrainConfig as given (see `plan.ensure_plan`). With `check_trainable`,
    every run is checked against the plan before it is written (`plan.check_trainable`), so bad
    flags fail before any run trains. Returns (stored plan document, patient mask, created).
    """
    check = functools.partial(plan.check_trainable, train_table) if check_trainable else None
    with queue.locked():
        stored, patient_mask, created = plan.ensure_plan(queue.logdir, document, train_table, test_table,
                                                         requested, check=check)
        queue.initialize(stored["campaign"]["n_runs"])
    if created:
        campaign = stored["campaign"]
        log(f"created the plan of {campaign['n_runs']} runs over {stored['n_patients']} patients "
            f"({stored['n_train_records']} training records) in {queue.logdir}; "
            f"{stored['schedule']['steps']} steps per run in {stored['train_config']['compute_dtype']}")
    return stored, patient_mask, created


@dataclasses.dataclass(frozen=True)
class CacheOptions:
    """Where and how images are decoded into the uint8 cache (see src/medleak/data_utils/image_cache.py)."""

    cache_dir: str | None = None
    num_workers: int | None = None
    # Leave out (and list) missing/undecodable images instead of stopping: the campaign then plans
    # over the records that have an image.
    skip_unreadable: bool = False


def load_splits(dataset: str, data_root, options: dict, img_size=None, cache: CacheOptions = CacheOptions()):
    """(train table, test table) of a dataset, each re-indexed from 0 (row i = logit row i).

    With `cache.skip_unreadable`, images are decoded here (once, into the cache) and records without
    a readable image are dropped before anything is planned over the tables.
    """
    from medleak.data_utils.datasets import load_dataset

    table = load_dataset(dataset, data_root, **options)
    splits = {"train": table.split("train"), "test": table.split("test")}
    for name, split in splits.items():
        if split.n_records == 0:
            raise MedleakError(f"{dataset}: the {name} split under --data_root={data_root} is empty")
        if cache.skip_unreadable:
            from medleak.data_utils.image_cache import cached_images

            _, kept = cached_images(split, data_root, img_size, cache_dir=cache.cache_dir,
                                    num_workers=cache.num_workers, skip_unreadable=True)
            splits[name] = dataclasses.replace(kept, df=kept.df.reset_index(drop=True))
    return splits["train"], splits["test"]


class RunTrainer:
    """Everything one worker process needs to train runs: cached images and one compiled Trainer."""

    def __init__(self, train_table, test_table, train_config, data_root, *, expected_train_size: int,
                 steps_per_epoch: int | None = None, cache: CacheOptions = CacheOptions(), log=_log,
                 external_test: str = ""):
        """`expected_train_size`, `steps_per_epoch`: a campaign's plan.json schedule (steps per
        epoch default to the Trainer's rule: run_eval_only)."""
        from medleak.data_utils.image_cache import cached_images

        started = time.time()
        self.train_table, self.test_table, self.config, self.log = train_table, test_table, train_config, log
        train_images, cached_train = cached_images(train_table, data_root, train_config.img_size,
                                                   cache_dir=cache.cache_dir, num_workers=cache.num_workers)
        test_images, cached_test = cached_images(test_table, data_root, train_config.img_size,
                                                 cache_dir=cache.cache_dir, num_workers=cache.num_workers)
        if cached_train.n_records != train_table.n_records or cached_test.n_records != test_table.n_records:
            raise MedleakError(f"{train_table.name}: the image cache left out unreadable images; "
                               "fix or remove them, or pass --skip_unreadable")
        self.cache_seconds = time.time() - started
        log(f"images ready: train {train_images.shape}, test {test_images.shape} ({self.cache_seconds:.1f} s)")
        self.train_labels = train_table.labels()
        self.test_labels = test_table.labels()
        self.trainer, self.dp = _build_trainer(train_config, train_images, self.train_labels, train_table,
                                               test_images, self.test_labels, expected_train_size, steps_per_epoch)
        self.test_subgroups = {name: test_table.df[name].to_numpy() for name in test_table.subgroups}
        self.batched = None  # BatchedTrainer, made on the first train_and_infer_many
        self.external = None
        if external_test:  # other datasets' test splits, scored by every run (evaluation/external.py)
            from medleak.evaluation.external import ExternalTests, parse_external_tests

            self.external = ExternalTests(parse_external_tests(external_test), train_table.label_names,
                                          train_config.img_size, train_table.channels, cache_dir=cache.cache_dir,
                                          batch_size=self.trainer.eval_batch_size)

    def train_and_infer(self, record_mask: np.ndarray, seed: int, checkpoints=None) -> dict:
        """Trains one model on the records where `record_mask` is True; returns the run's contents
        (the run files' arrays and metrics, and the TrainedModel under "model", for `write_run`).

        `checkpoints` (`RunCheckpoints`, see `run_checkpoints`): the run resumes from its newest
        checkpoint and saves new ones there.
        """
        train_indices = np.flatnonzero(record_mask)
        dp_summary = self._dp_summary(train_indices)
        started = time.time()
        model = self.trainer.train(train_indices, seed, progress=sys.stderr.isatty(), checkpoints=checkpoints,
                                   log_progress=progress_lines(self.log, seed, self.config.batch_size))
        trained = time.time()
        train_logits = self.trainer.infer_train_views(model)
        test_logits = self.trainer.infer_test(model)
        return self._run_contents(record_mask, model, train_logits, test_logits, dp_summary,
                                  train_seconds=trained - started, infer_seconds=time.time() - trained)

    def train_and_infer_many(self, record_masks, seeds, checkpoints, models_per_program: int) -> list:
        """`train_and_infer` of several runs, `models_per_program` per device program
        (train_utils/batched.py): per run its contents, or its TrainingDiverged (the others go on)."""
        from medleak.train_utils.batched import BatchedTrainer, ModelJob
        from medleak.train_utils.training import TrainedModel

        if self.batched is None or self.batched.models_per_program != models_per_program:
            self.batched = BatchedTrainer(self.trainer, models_per_program)
            self.log(f"training {models_per_program} models per program on {self.batched.n_devices} device(s)")
        indices = [np.flatnonzero(mask) for mask in record_masks]
        dp_summaries = [self._dp_summary(rows) for rows in indices]
        started = time.time()
        outcomes = self.batched.train(
            [ModelJob(rows, seed, c) for rows, seed, c in zip(indices, seeds, checkpoints)],
            log_progress=progress_lines(self.log, seeds[0], self.config.batch_size * len(seeds)))
        trained = time.time()
        models = [m for m in outcomes if isinstance(m, TrainedModel)]
        views = iter(self.batched.infer_train_views(models))
        tests = iter(self.batched.infer_test(models))
        infer_seconds = time.time() - trained
        return [outcome if not isinstance(outcome, TrainedModel) else self._run_contents(
                    mask, outcome, next(views), next(tests), dp_summary,
                    train_seconds=trained - started, infer_seconds=infer_seconds)
                for mask, outcome, dp_summary in zip(record_masks, outcomes, dp_summaries)]

    def _dp_summary(self, train_indices):
        if self.dp is None:
            return None
        from medleak.dp.accounting import format_summary

        summary = self.dp.summary(train_indices)
        self.log(format_summary(summary))
        return summary

    def _run_contents(self, record_mask, model, train_logits, test_logits, dp_summary, *, train_seconds: float,
                      infer_seconds: float) -> dict:
        """A trained run's files' arrays and metrics (train/test metrics, timings, DP summary)."""
        from medleak.train_utils.metrics import classification_metrics

        task = self.train_table.task
        train_logits = np.asarray(train_logits, dtype=np.float32)
        test_logits = np.asarray(test_logits, dtype=np.float32)
        clean = train_logits[:, 0]
        losses = np.asarray(model.losses)
        metrics = {
            "test": classification_metrics(test_logits, self.test_labels, task, self.test_subgroups),
            "train_in": classification_metrics(clean[record_mask], self.train_labels[record_mask], task),
            "train_out": (classification_metrics(clean[~record_mask], self.train_labels[~record_mask], task)
                          if (~record_mask).any() else None),
            "final_train_loss": float(losses[-max(1, len(losses) // 10):].mean()) if losses.size else None,
            "n_train_in": int(record_mask.sum()),
            "seed": model.seed,  # a resumed run keeps its checkpoint's seed
            "config": self.config.to_dict(),
            "timings": dict(model.timings, train_seconds=train_seconds, infer_seconds=infer_seconds,
                            compile_seconds_total=self._compile_seconds()),
            "dp": dp_summary,
        }
        if self.external is not None:
            metrics["external_test"] = self.external.metrics(self.trainer.model, model.eval_variables,
                                                             self.config.augment)
        metrics.update(rundir.environment_info())
        return dict(train_logits=train_logits, train_labels=self.train_labels, record_mask=record_mask,
                    test_logits=test_logits, test_labels=self.test_labels, metrics=metrics, model=model)

    def _compile_seconds(self) -> dict:
        seconds = dict(self.trainer.compile_seconds)
        if self.batched is not None:
            seconds.update({f"batched_{name}": value for name, value in self.batched.compile_seconds.items()})
        return seconds

    def write_run(self, directory, contents: dict, *, save_weights: bool) -> Path:
        """Writes `train_and_infer`'s run files into `directory`; with `save_weights` also the model's
        EMA weights and config (`directory/model/`, train_utils/saved_model.py)."""
        directory = rundir.write_run_files(directory, **{k: v for k, v in contents.items() if k != "model"})
        if save_weights:
            from medleak.train_utils.saved_model import save_model

            save_model(directory / rundir.MODEL_DIR, contents["model"].eval_variables, config=self.trainer.config,
                       n_classes=self.trainer.n_classes, task=self.train_table.task,
                       channels=self.trainer.images.shape[-1], label_names=self.train_table.label_names,
                       trained_on=_trained_on(self.train_table, contents["record_mask"]))
        return directory


def _trained_on(train_table, record_mask) -> dict:
    """The saved model's record of its training patients (train_utils/finetune.training_record)."""
    from medleak.train_utils.finetune import training_record

    return training_record(train_table.name, train_table.df["patient_id"].to_numpy()[np.asarray(record_mask)])


def run_checkpoints(directory, campaign_config, log=_log):
    """The `RunCheckpoints` of one run in `directory`, saved every --checkpoint_minutes (None when 0)."""
    minutes = campaign_config.checkpoint_minutes
    if not minutes >= 0:
        raise MedleakError(f"--checkpoint_minutes={minutes}: give minutes between checkpoints, or 0 for none")
    if minutes == 0:
        return None
    from medleak.train_utils.checkpoint import RunCheckpoints

    return RunCheckpoints(directory, every_seconds=60.0 * minutes, log=log)


def _build_trainer(config, train_images, train_labels, train_table, test_images, test_labels, expected_train_size,
                   stored_steps_per_epoch=None):
    """(the worker's Trainer, its DpTraining or None); the Trainer compiles on its first run.

    With --epsilon set, DP-SGD (src/medleak/dp) replaces the batch schedule (Poisson sampling of records or
    patients) and the gradient estimator (clip, sum, add noise); nothing else changes. Both train
    `stored_steps_per_epoch` (the plan's) when given, so DP accounts for the steps the run takes.
    """
    from medleak.train_utils.training import Trainer, config_model, planned_steps_per_epoch

    initial = {}
    if config.init_from:  # every run starts from the same pretrained weights (train_utils/finetune.py)
        from medleak.train_utils.finetune import pretrained_initializer

        initial["initial_variables"] = pretrained_initializer(
            config, config_model(config, train_labels.shape[1]), train_labels.shape[1], train_table.label_names)
    steps_per_epoch = planned_steps_per_epoch(stored_steps_per_epoch, expected_train_size, config.batch_size)
    if not config.dp:
        return Trainer(config, train_images, train_labels, train_table.task, test_images, test_labels,
                       expected_train_size=expected_train_size, steps_per_epoch=steps_per_epoch, **initial), None
    from medleak.dp.estimator import DpTraining

    dp = DpTraining(config, train_table.df["patient_id"].astype(str).to_numpy(), steps_per_epoch)
    trainer = Trainer(config, train_images, train_labels, train_table.task, test_images, test_labels,
                      expected_train_size=expected_train_size, steps_per_epoch=steps_per_epoch,
                      schedule_fn=dp.schedule_fn, gradient_estimator=dp.gradient_estimator, **initial)
    return trainer, dp


def check_init_from(train_config, dataset: str, train_table) -> None:
    """--init_from: refused when the pretrained model saw this dataset or these patients."""
    if train_config.init_from:
        from medleak.train_utils.finetune import check_disjoint, load_pretrained

        check_disjoint(load_pretrained(train_config), dataset, train_table.df["patient_id"].to_numpy())


def run_campaign(dataset: str, *, data_root, logdir, train_config, campaign_config, options=None,
                 cache: CacheOptions = CacheOptions(), log=_log, external_test: str = "",
                 models_per_program: int = 1):
    """One worker of a shadow-model campaign; returns the WorkSummary when nothing is left to claim.

    `models_per_program` (--models_per_program; 0: the backend's default): runs claimed and trained
    together, K models per device program (train_utils/batched.py); each run is still its own
    attempt, checkpoints and run directory.
    """
    train_table, test_table = load_splits(dataset, data_root, options or {}, train_config.img_size, cache)
    check_init_from(train_config, dataset, train_table)
    queue = WorkQueue(logdir, lease_seconds=campaign_config.lease_seconds,
                      max_attempts=campaign_config.max_attempts)
    if train_config.dp:  # --delta=0: one delta for the campaign, fixed (in plan.json) when planned
        from medleak.dp.estimator import campaign_delta
        train_config = campaign_delta(train_config, train_table.df["patient_id"].astype(str).to_numpy(),
                                      rundir.read_plan(logdir))
    # "auto" choices (the compute dtype) are made for this backend, or taken from an existing plan.
    document = plan.plan_document(dataset, train_table, test_table, plan.resolve_train_config(train_config, train_table),
                                  campaign_config)
    stored, patient_mask, _ = prepare_campaign(queue, document, train_table, test_table, log=log,
                                               requested=train_config)
    train_config = TrainConfig.from_dict(stored["train_config"])  # the plan's, equal up to "auto" choices
    _, record_patient_index = plan.patient_index(train_table.df["patient_id"])

    @functools.cache
    def run_trainer():
        # built on the first claim only: a worker with nothing to do never decodes or compiles
        return RunTrainer(train_table, test_table, train_config, data_root,
                          expected_train_size=stored["schedule"]["expected_train_size"],
                          steps_per_epoch=stored["schedule"]["steps_per_epoch"], cache=cache, log=log,
                          external_test=external_test)

    def run_seed(claim):
        return plan.run_seed(campaign_config.seed, claim.run_index, claim.attempt)

    def run_mask(claim):
        return plan.record_mask(patient_mask[claim.run_index], record_patient_index)

    def checkpoints_of(claim):
        return run_checkpoints(rundir.checkpoint_dir(logdir, claim.run_index), campaign_config, log)

    def publishable(claim, contents) -> Path:
        contents["metrics"].update(run=claim.run_index, dataset=dataset, attempt=claim.attempt)
        _log_test_metrics(log, rundir.run_dir_name(claim.run_index), contents["metrics"])
        # published by the work queue (rundir.commit_run, which deletes the run's checkpoints)
        return run_trainer().write_run(rundir.tmp_run_dir(logdir, claim.run_index), contents,
                                       save_weights=campaign_config.save_weights)

    def do_run(claim) -> Path:
        return publishable(claim, run_trainer().train_and_infer(run_mask(claim), run_seed(claim),
                                                                checkpoints_of(claim)))

    def do_runs(claims) -> list:
        outcomes = run_trainer().train_and_infer_many(
            [run_mask(c) for c in claims], [run_seed(c) for c in claims], [checkpoints_of(c) for c in claims],
            models_per_program)
        return [outcome if isinstance(outcome, BaseException) else publishable(claim, outcome)
                for claim, outcome in zip(claims, outcomes)]

    from medleak.train_utils.device import resolve_models_per_program

    models_per_program = resolve_models_per_program(models_per_program)
    if models_per_program > 1:
        return work_loop(queue, do_runs, log=log, runs_per_claim=models_per_program)
    return work_loop(queue, do_run, log=log)


def run_eval_only(dataset: str, *, data_root, logdir, train_config, campaign_config, options=None,
                  cache: CacheOptions = CacheOptions(), log=_log, external_test: str = "") -> dict:
    """Trains one model on the whole training split; prints and writes its test metrics.

    Written to `<logdir>/eval_only/` (same files as a run directory, and the model in `model/`;
    replaced on every call). Interrupted, it resumes from `<logdir>/checkpoints/eval_only/`.
    """
    train_table, test_table = load_splits(dataset, data_root, options or {}, train_config.img_size, cache)
    check_init_from(train_config, dataset, train_table)
    train_config = plan.resolve_train_config(train_config, train_table)  # recorded in metrics.json as trained
    trainer = RunTrainer(train_table, test_table, train_config, data_root,
                         expected_train_size=train_table.n_records, cache=cache, log=log,
                         external_test=external_test)
    checkpoints = run_checkpoints(Path(logdir) / rundir.CHECKPOINTS_DIR / EVAL_ONLY_DIR, campaign_config, log)
    contents = trainer.train_and_infer(np.ones(train_table.n_records, dtype=bool), campaign_config.seed,
                                       checkpoints)
    contents["metrics"].update(run=None, dataset=dataset, eval_only=True)
    final = Path(logdir) / EVAL_ONLY_DIR
    tmp = trainer.write_run(Path(logdir) / f".tmp-{EVAL_ONLY_DIR}-{socket.gethostname()}-{os.getpid()}",
                            contents, save_weights=True)
    rundir.replace_dir(tmp, final)
    if checkpoints is not None:
        checkpoints.delete()
    _log_test_metrics(log, "eval_only", contents["metrics"])
    for name, groups in contents["metrics"]["test"]["subgroups"].items():
        for value, group in groups.items():
            log(f"  test {name}={value}: n={group['n']} · accuracy {_fmt(group['accuracy'])} · "
                f"macro AUROC {_fmt(group['macro_auroc'])}")
    log(f"wrote {final} (the model: {final / rundir.MODEL_DIR}, read by medleak.load_model)")
    return contents["metrics"]


def _log_test_metrics(log, name, metrics):
    test, train_in = metrics["test"], metrics["train_in"]
    log(f"{name}: test accuracy {_fmt(test['accuracy'])} · test macro AUROC {_fmt(test['macro_auroc'])} · "
        f"train accuracy {_fmt(train_in['accuracy'])} · {metrics['timings']['train_seconds']:.1f} s training")


def _fmt(value):
    return "n/a" if value is None else f"{value:.4f}"


def main_from_flags(dataset: str, argv) -> int:
    """absl main of a dataset script: flags → run_campaign / run_eval_only."""
    from absl import flags

    from medleak.campaign import flags as campaign_flags

    FLAGS = flags.FLAGS
    if len(argv) > 1:
        raise MedleakError(f"unexpected argument(s) {argv[1:]}; all settings are --flags (see --help)")
    # before JAX touches the device: several workers per GPU each take their share of its memory
    from medleak.train_utils.device import configure_device_memory

    configure_device_memory(FLAGS.workers_per_device)
    kwargs = dict(
        data_root=FLAGS.data_root,
        logdir=FLAGS.logdir,
        train_config=campaign_flags.train_config_from_flags(FLAGS),
        campaign_config=campaign_flags.campaign_config_from_flags(FLAGS),
        options=campaign_flags.loader_options_from_flags(dataset, FLAGS),
        cache=CacheOptions(FLAGS.cache_dir, FLAGS.cache_workers, FLAGS.skip_unreadable),
        external_test=FLAGS.external_test,
    )
    if FLAGS.eval_only:
        run_eval_only(dataset, **kwargs)
    else:
        run_campaign(dataset, **kwargs, models_per_program=FLAGS.models_per_program)
    return 0


def run_script(dataset: str) -> None:
    """What each dataset script calls: define its flags and run one worker (`--help` exits 0)."""
    from medleak.cli import quiet_console, run_absl

    quiet_console()  # before anything imports jax
    from medleak.campaign import flags as campaign_flags

    campaign_flags.define_flags(dataset)
    run_absl(functools.partial(main_from_flags, dataset))


# Console entry points (pyproject.toml): `medleak-chexpert --flags…` is `python chexpert.py --flags…`.
def chexpert() -> None:
    run_script("chexpert")


def mimic() -> None:
    run_script("mimic")


def embed() -> None:
    run_script("embed")


def fairvision() -> None:
    run_script("fairvision")


def fitzpatrick() -> None:
    run_script("fitzpatrick")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python -m medleak.campaign.main <dataset> --flags…")
    run_script(sys.argv.pop(1))
