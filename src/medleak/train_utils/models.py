"""Image classifiers (flax.linen) and the registry that builds them by name.

- `small_cnn`: three conv stages (32/64/128 channels, ~93k parameters), fast enough on a CPU for
  the tests; it cannot memorise mislabelled images (its loss plateaus: bench/memorisation.py).
- `wrn_<depth>_<width>`: pre-activation wide ResNet (Zagoruyko & Komodakis) as in the LiRA code
  the paper builds on: a 3x3 stem with 16 channels, then three stages of (depth - 4) / 6 blocks with
  16k, 32k and 64k channels (k = width; strides 1, 2, 2), LeakyReLU(0.1), global average pooling.
  `wrn_28_2` has ~1.47M parameters; `wrn_10_1` (one block per stage, 16/32/64 channels, ~78k) is
  the CPU-sized one that still memorises mislabelled images as WRN-28-2 does on a GPU (the demo's).
- `resnet9`: torchvision's ResNet-18 layout with one BasicBlock per stage, as DP_CXR uses it: a 7x7
  stride-2 stem (64) with a 3x3 stride-2 max-pool, stages of 64/128/256/512 channels (strides
  1, 2, 2, 2; 1x1 projection shortcut when the shape changes), global average pooling, GroupNorm(32)
  after every convolution and ReLU or Mish (`activation`). ~4.9M parameters with a 14-label head on
  grayscale images; it needs inputs of at least 64x64 (config.MIN_IMAGE_SIDE).

Every model takes float images (B, H, W, C) of any size and channel count and returns logits
(B, num_classes) in float32. Normalisation is GroupNorm(16) by default, which works with per-example
gradients (DP-SGD); `norm="batch"` selects BatchNorm, whose running statistics live in the
`batch_stats` collection (call with `mutable=["batch_stats"]` when `train=True`).
`dtype` is the compute dtype (e.g. bfloat16); parameters are always created in float32.
"""

import functools

import flax.linen as nn
import jax.numpy as jnp

from medleak.config import check_image_size, check_model
from medleak.errors import MedleakError

GROUPS = 16  # GroupNorm groups: every channel count used here is a multiple of 16
LEAKY_SLOPE = 0.1

# He-normal over fan-out, as in the WRN/LiRA code: keeps activations' scale through deep stacks.
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
dense_init = nn.initializers.glorot_normal()


def leaky_relu(x):
    return nn.leaky_relu(x, negative_slope=LEAKY_SLOPE)


class Norm(nn.Module):
    """GroupNorm(16) or BatchNorm, chosen by name so one model definition serves both."""

    kind: str = "group"
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool):
        if self.kind == "group":
            return nn.GroupNorm(num_groups=min(GROUPS, x.shape[-1]), epsilon=1e-5, dtype=self.dtype)(x)
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)(x)


class SmallCNN(nn.Module):
    """Conv(32)-pool-Conv(64)-pool-Conv(128)-global pool-Dense, each conv followed by norm + LeakyReLU."""

    num_classes: int
    widths: tuple = (32, 64, 128)
    norm: str = "group"
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = x.astype(self.dtype)
        for i, width in enumerate(self.widths):
            if i > 0:
                x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")
            x = nn.Conv(width, (3, 3), use_bias=False, kernel_init=conv_init, dtype=self.dtype)(x)
            x = leaky_relu(Norm(self.norm, self.dtype)(x, train))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype)(x).astype(jnp.float32)


class PreActBlock(nn.Module):
    """Pre-activation residual block: norm-act-conv-norm-act-conv, 1x1 conv shortcut on shape change."""

    width: int
    stride: int
    norm: str
    dtype: object

    @nn.compact
    def __call__(self, x, train: bool):
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
        activated = leaky_relu(Norm(self.norm, self.dtype)(x, train))
        if self.stride != 1 or x.shape[-1] != self.width:
            # The shortcut sees the activated input, as in the pre-activation ResNet paper.
            shortcut = conv(self.width, (1, 1), strides=self.stride)(activated)
        else:
            shortcut = x
        y = conv(self.width, (3, 3), strides=self.stride)(activated)
        y = leaky_relu(Norm(self.norm, self.dtype)(y, train))
        y = conv(self.width, (3, 3))(y)
        return shortcut + y


class WideResNet(nn.Module):
    """Pre-activation WRN-depth-width (widths 16k/32k/64k), LeakyReLU(0.1)."""

    num_classes: int
    depth: int = 28
    width: int = 2
    norm: str = "group"
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        blocks_per_stage = (self.depth - 4) // 6
        x = x.astype(self.dtype)
        x = nn.Conv(16, (3, 3), use_bias=False, kernel_init=conv_init, dtype=self.dtype)(x)
        for stage, base in enumerate((16, 32, 64)):
            for block in range(blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                x = PreActBlock(base * self.width, stride, self.norm, self.dtype)(x, train)
        x = leaky_relu(Norm(self.norm, self.dtype)(x, train))
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype)(x).astype(jnp.float32)


RESNET9_GROUPS = 32  # DP_CXR replaces every BatchNorm of the torchvision ResNet by GroupNorm(32)


def mish(x):
    """x * tanh(softplus(x)) (Misra 2019)."""
    return x * jnp.tanh(nn.softplus(x))


ACTIVATION_FUNCTIONS = {"relu": nn.relu, "mish": mish}


class BasicBlock(nn.Module):
    """torchvision's BasicBlock (post-activation): conv-norm-act-conv-norm, + shortcut, act."""

    width: int
    stride: int
    activation: str
    dtype: object

    @nn.compact
    def __call__(self, x):
        act = ACTIVATION_FUNCTIONS[self.activation]
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_init, dtype=self.dtype)
        norm = functools.partial(nn.GroupNorm, num_groups=RESNET9_GROUPS, epsilon=1e-5, dtype=self.dtype)
        y = conv(self.width, (3, 3), strides=self.stride, padding=((1, 1), (1, 1)))(x)
        y = conv(self.width, (3, 3), padding=((1, 1), (1, 1)))(act(norm()(y)))
        y = norm()(y)
        if self.stride != 1 or x.shape[-1] != self.width:
            x = norm()(conv(self.width, (1, 1), strides=self.stride, padding="VALID")(x))
        return act(x + y)


class ResNet9(nn.Module):
    """torchvision ResNet(BasicBlock, [1, 1, 1, 1]) with GroupNorm(32) and ReLU or Mish."""

    num_classes: int
    activation: str = "relu"
    widths: tuple = (64, 128, 256, 512)
    dtype: object = jnp.float32

    @nn.compact
    def __call__(self, x, train: bool = False):
        check_image_size("resnet9", x.shape[1:3])
        act = ACTIVATION_FUNCTIONS[self.activation]
        x = x.astype(self.dtype)
        x = nn.Conv(self.widths[0], (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False,
                    kernel_init=conv_init, dtype=self.dtype)(x)
        x = act(nn.GroupNorm(num_groups=RESNET9_GROUPS, epsilon=1e-5, dtype=self.dtype)(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage, width in enumerate(self.widths):
            x = BasicBlock(width, 1 if stage == 0 else 2, self.activation, self.dtype)(x)
        x = x.mean(axis=(1, 2))
        return nn.Dense(self.num_classes, kernel_init=dense_init, dtype=self.dtype)(x).astype(jnp.float32)


def create_model(name: str, num_classes: int, norm: str = "group", dtype=jnp.float32,
                 activation: str = "relu") -> nn.Module:
    """Builds a model by registry name: `small_cnn`, `resnet9` or `wrn_<depth>_<width>` (depth = 6n + 4).

    `activation` (relu | mish) is resnet9's; small_cnn and the WRN use LeakyReLU(0.1). resnet9
    always uses GroupNorm(32) (`norm="batch"` is refused for it).
    """
    if num_classes < 1:
        raise MedleakError(f"a model needs at least one output class, got num_classes={num_classes}")
    architecture = check_model(name, norm, activation)
    if architecture[0] == "small_cnn":
        return SmallCNN(num_classes=num_classes, norm=norm, dtype=dtype)
    if architecture[0] == "resnet9":
        return ResNet9(num_classes=num_classes, activation=activation, dtype=dtype)
    _, depth, width = architecture
    return WideResNet(num_classes=num_classes, depth=depth, width=width, norm=norm, dtype=dtype)


def model_names() -> tuple:
    """Examples of valid model names (the WRN family accepts any valid depth/width)."""
    return ("small_cnn", "resnet9", "wrn_10_1", "wrn_16_4", "wrn_28_2", "wrn_28_10")
