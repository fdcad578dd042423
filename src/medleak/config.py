"""Training and campaign configuration: plain dataclasses that round-trip through JSON.

`TrainConfig` is everything that determines what one shadow model is (stored in plan.json; a worker
whose config differs from the stored one is refused). `CampaignConfig` is how the campaign is run.
Per-dataset defaults (SPEC.md, from the paper) live in `DATASET_DEFAULTS`.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: str = "wrn_28_2"
    norm: str = "group"  # "group" (DP-compatible) or "batch"
    img_size: tuple = (64, 64)  # (height, width)
    epochs: int = 10
    batch_size: int = 256
    learning_rate: float = 0.1
    weight_decay: float = 5e-4
    momentum: float = 0.9
    nesterov: bool = False
    warmup_epochs: float = 1.0
    ema_decay: float = 0.0  # 0 disables EMA; evaluation uses EMA weights when enabled
    grad_accum: int = 1
    augment: str = "weak"  # none | trivial | weak | medium | strong
    eval_views: int = 16
    compute_dtype: str = "float32"  # or "bfloat16" (parameters stay float32)
    # Differential privacy (epsilon = inf disables DP-SGD).
    epsilon: float = float("inf")
    delta: float = 0.0  # 0 → 1/n_train units (records or patients)
    clip_norm: float = 1.0
    dp_unit: str = "record"  # "record" or "patient"

    @property
    def dp(self) -> bool:
        return self.epsilon != float("inf")

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
    n_runs: int = 16
    subset_ratio: float = 0.5
    seed: int = 0
    max_attempts: int = 3
    lease_seconds: float = 300.0


# Paper defaults (SPEC.md "Per-dataset defaults"): WRN-28-2, 64x64, SGD momentum 0.9, 50 % subsets,
# 16 eval views. Values not listed fall back to TrainConfig's defaults.
DATASET_DEFAULTS = {
    "chexpert": dict(epochs=60, learning_rate=1.0, batch_size=1024, ema_decay=0.9995),
    "mimic": dict(epochs=60, learning_rate=0.25, batch_size=1024, ema_decay=0.9995),
    "embed": dict(epochs=30, learning_rate=0.1, img_size=(64, 48)),
    "fairvision": dict(epochs=100),
    "fitzpatrick": dict(epochs=100, learning_rate=5e-3, batch_size=256),
}
