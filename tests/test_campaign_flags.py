"""Flags shared by the dataset scripts: per-dataset defaults, loader options, DP fields, bad values."""

import pytest
from absl import flags

from medleak.campaign import flags as campaign_flags
from medleak.config import DATASET_DEFAULTS, TrainConfig
from medleak.data_utils.datasets import dataset_options
from medleak.errors import MedleakError


def parsed(dataset, *argv):
    flag_values = flags.FlagValues()
    campaign_flags.define_flags(dataset, flag_values, help_module="test")
    flag_values(["script.py", *argv])
    return flag_values


@pytest.mark.parametrize("dataset", sorted(DATASET_DEFAULTS))
def test_defaults_are_the_datasets_paper_defaults(dataset):
    flag_values = parsed(dataset)
    config = campaign_flags.train_config_from_flags(flag_values)
    assert config == TrainConfig(**DATASET_DEFAULTS[dataset])
    campaign = campaign_flags.campaign_config_from_flags(flag_values)
    assert (campaign.n_runs, campaign.subset_ratio, campaign.lease_seconds) == (200, 0.5, 300.0)
    assert flag_values.logdir == f"./logs/{dataset}"
    for option in dataset_options(dataset):
        assert option in flag_values  # the loader's options are flags of the script
    assert campaign_flags.loader_options_from_flags(dataset, flag_values) == {
        option: str(default) for option, (default, _) in dataset_options(dataset).items() if default is not None}


def test_flags_map_onto_train_config_dp_fields_and_loader_options():
    flag_values = parsed("embed", "--img_size=32,24", "--epochs=3", "--learning_rate=0.5", "--epsilon=8",
                         "--delta=1e-5", "--clip_norm=0.5", "--dp_unit=patient", "--augment=none",
                         "--n_runs=16", "--max_attempts=5", "--lease_seconds=60", "--seed=7")
    config = campaign_flags.train_config_from_flags(flag_values)
    assert config.img_size == (32, 24) and config.epochs == 3 and config.learning_rate == 0.5
    assert (config.epsilon, config.delta, config.clip_norm, config.dp_unit) == (8.0, 1e-5, 0.5, "patient")
    assert config.dp and config.augment == "none"
    campaign = campaign_flags.campaign_config_from_flags(flag_values)
    assert (campaign.n_runs, campaign.max_attempts, campaign.lease_seconds, campaign.seed) == (16, 5, 60.0, 7)
    option = next(iter(dataset_options("embed")))
    flag_values = parsed("embed", f"--{option}=custom.csv")
    assert campaign_flags.loader_options_from_flags("embed", flag_values)[option] == "custom.csv"


@pytest.mark.parametrize("text,size", [("64,64", (64, 64)), ("64x48", (64, 48)), ("32", (32, 32)), (" 16 , 8 ", (16, 8))])
def test_img_size_parsing(text, size):
    assert campaign_flags.parse_img_size(text) == size


@pytest.mark.parametrize("argv,flag", [
    (["--img_size=64,a"], "--img_size"), (["--img_size=2,2"], "--img_size"), (["--epochs=0"], "--epochs"),
    (["--learning_rate=0"], "--learning_rate"), (["--ema_decay=1"], "--ema_decay"),
    (["--dp_unit=study"], "--dp_unit"), (["--epsilon=0"], "--epsilon"), (["--warmup=1"], "--warmup"),
    (["--warmup=-0.1"], "--warmup"), (["--batch_size=100", "--grad_accum=3"], "--grad_accum"),
    (["--weight_decay=-1"], "--weight_decay"), (["--momentum=1"], "--momentum"),
])
def test_bad_values_are_refused_naming_the_flag(argv, flag):
    with pytest.raises(MedleakError, match=flag):
        campaign_flags.train_config_from_flags(parsed("fitzpatrick", *argv))


@pytest.mark.parametrize("argv,flag", [
    (["--model=resnet"], "--model"), (["--model=wrn_27_2"], "--model"), (["--augment=heavy"], "--augment"),
    (["--norm=layer"], "--norm"), (["--compute_dtype=float16"], "--compute_dtype"),
    (["--epsilon=8", "--norm=batch"], "--norm=batch"), (["--epsilon=8", "--clip_norm=0"], "--clip_norm"),
])
def test_unknown_names_are_refused_before_a_plan_records_them(argv, flag):
    # Refused at flag parsing: were they first found while training, plan.json would already hold
    # them and the corrected command would be refused as "a different config" on that logdir.
    with pytest.raises(MedleakError, match=flag):
        campaign_flags.train_config_from_flags(parsed("fitzpatrick", *argv))


def test_trainer_validates_with_the_same_method_as_the_flags():
    # One validation (TrainConfig.validate): a config built in code is refused by the Trainer with
    # the flag's name, exactly as the flags refuse it.
    import numpy as np

    from medleak.train_utils.training import Trainer

    images, labels = np.zeros((4, 8, 8, 1), np.uint8), np.eye(2, dtype=np.float32)[[0, 1, 0, 1]]
    for bad in (dict(warmup=1.5), dict(augment="heavy"), dict(batch_size=6, grad_accum=4)):
        config = TrainConfig(model="small_cnn", img_size=(8, 8), **bad)
        with pytest.raises(MedleakError) as from_trainer:
            Trainer(config, images, labels, "multiclass")
        with pytest.raises(MedleakError) as from_validate:
            config.validate()
        assert str(from_trainer.value) == str(from_validate.value)


def test_unknown_dataset_is_refused():
    with pytest.raises(MedleakError, match="unknown dataset"):
        campaign_flags.define_flags("imagenet", flags.FlagValues())
