"""Campaign set-up: which records a campaign plans over when some images are unreadable."""

import pytest

from medleak.campaign.main import CacheOptions, RunTrainer, load_splits
from medleak.config import TrainConfig
from medleak.errors import MedleakError
from tests.layouts import write_chexpert


def _corrupt_first_train_image(data_root):
    train, _ = load_splits("chexpert", data_root, {})
    victim = train.df["path"].iloc[0]
    (data_root / victim).write_bytes(b"not a jpeg")
    return train, victim


def test_skip_unreadable_drops_the_record_before_planning(tmp_path):
    data_root = write_chexpert(tmp_path / "data", n_patients=8)
    train, victim = _corrupt_first_train_image(data_root)
    cache = CacheOptions(cache_dir=str(tmp_path / "cache"), skip_unreadable=True)

    kept_train, kept_test = load_splits("chexpert", data_root, {}, (16, 16), cache)

    assert kept_train.n_records == train.n_records - 1
    assert victim not in set(kept_train.df["path"])
    assert list(kept_train.df.index) == list(range(kept_train.n_records))  # row i = logit row i
    assert kept_test.n_records > 0


def test_unreadable_image_without_the_flag_is_a_one_line_error(tmp_path):
    data_root = write_chexpert(tmp_path / "data", n_patients=8)
    _, victim = _corrupt_first_train_image(data_root)
    train, test = load_splits("chexpert", data_root, {})
    with pytest.raises(MedleakError) as error:
        RunTrainer(train, test, TrainConfig(model="small_cnn", img_size=(16, 16)), data_root,
                   expected_train_size=train.n_records, cache=CacheOptions(cache_dir=str(tmp_path / "cache")))
    message = str(error.value)
    assert "\n" not in message and victim in message and "--skip_unreadable" in message
