"""More client models, of other architectures: written here the way their users write them
in Flax (flax's examples, the NNX docs, the usual ports of the papers), not taken from
ifjax's own ``models/``. Each comes with an input, variables and one training step of the
kind its users write.

- MobileNetV2: inverted residuals, depthwise convolutions (feature_group_count=hidden),
  relu6, BatchNorm; a block without expansion and a strided one.
- ConvNeXt: patchify stem, depthwise 7x7, LayerNorm, pointwise Dense layers, a learned
  layer scale ``gamma``, a LayerNorm + strided conv downsampling.
- DenseNet: dense layers whose output is the input concatenated with the new features,
  a transition with average pooling.
- U-Net: two encoder levels, skips concatenated with upsampled features (ConvTranspose or
  jax.image.resize), a per-pixel head.
- GroupNormResNet: basic blocks with GroupNorm, the second with weight-standardized
  convolutions (BiT).
- ResNeXt: bottleneck blocks whose 3x3 convolution is grouped (cardinality 4).
- NnxMobileNetV2: MobileNetV2 as the NNX docs write modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.training import train_state

from tests.clients import _images, _randomize_nnx
from tests.conftest import randomized

# ----------------------------------------------------------------------------- MobileNetV2
# Block settings as in the paper's table: (expansion t, output channels c, repeats n,
# stride s); the first block of a row has the stride, the others add a residual.


class InvertedResidual(nn.Module):
    features: int
    expansion: int
    strides: int = 1

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        in_features = x.shape[-1]
        hidden = in_features * self.expansion
        y = x
        if self.expansion != 1:
            y = nn.Conv(hidden, (1, 1), use_bias=False, name="expand")(y)
            y = nn.relu6(norm(name="expand_bn")(y))
        y = nn.Conv(
            features=hidden,
            kernel_size=(3, 3),
            strides=(self.strides, self.strides),
            feature_group_count=hidden,
            use_bias=False,
            name="depthwise",
        )(y)
        y = nn.relu6(norm(name="depthwise_bn")(y))
        y = nn.Conv(self.features, (1, 1), use_bias=False, name="project")(y)
        y = norm(name="project_bn")(y)
        if self.strides == 1 and in_features == self.features:
            y = x + y
        return y


class MobileNetV2(nn.Module):
    num_classes: int = 10
    stem_features: int = 12
    block_settings: Sequence[tuple[int, int, int, int]] = (
        (1, 8, 1, 1),
        (4, 12, 2, 2),
        (4, 16, 2, 1),
    )
    last_features: int = 32

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        x = nn.Conv(self.stem_features, (3, 3), strides=(2, 2), use_bias=False, name="stem")(x)
        x = nn.relu6(norm(name="stem_bn")(x))
        for t, c, n, s in self.block_settings:
            for i in range(n):
                x = InvertedResidual(c, t, s if i == 0 else 1)(x, train=train)
        x = nn.Conv(self.last_features, (1, 1), use_bias=False, name="last_conv")(x)
        x = nn.relu6(norm(name="last_bn")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)


def linen_mobilenet(batch: int = 2):
    model = MobileNetV2()
    x = _images((batch, 16, 16, 3), seed=10)
    variables = model.init(jax.random.key(10), x, train=False)
    return model, randomized(variables, seed=10), x


# ----------------------------------------------------------------------------- ConvNeXt
# Channels-last throughout: the pointwise convolutions are Dense layers on the last axis,
# the layer scale is a ``gamma`` parameter per channel.


class ConvNeXtBlock(nn.Module):
    dim: int
    layer_scale_init_value: float = 1e-6

    @nn.compact
    def __call__(self, x):
        shortcut = x
        x = nn.Conv(self.dim, (7, 7), feature_group_count=self.dim, name="dwconv")(x)
        x = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
        x = nn.Dense(4 * self.dim, name="pwconv1")(x)
        x = nn.gelu(x)
        x = nn.Dense(self.dim, name="pwconv2")(x)
        if self.layer_scale_init_value > 0:
            gamma = self.param(
                "gamma", nn.initializers.constant(self.layer_scale_init_value), (self.dim,)
            )
            x = gamma * x
        return shortcut + x


class ConvNeXt(nn.Module):
    num_classes: int = 10
    depths: Sequence[int] = (2, 1)
    dims: Sequence[int] = (16, 32)
    layer_scale_init_value: float = 1e-6

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims, strict=True)):
            if i == 0:  # stem: patchify
                x = nn.Conv(dim, (2, 2), strides=(2, 2), padding="VALID", name="stem_conv")(x)
                x = nn.LayerNorm(epsilon=1e-6, name="stem_norm")(x)
            else:  # downsampling layer
                x = nn.LayerNorm(epsilon=1e-6, name=f"downsample{i}_norm")(x)
                x = nn.Conv(
                    dim, (2, 2), strides=(2, 2), padding="VALID", name=f"downsample{i}_conv"
                )(x)
            for j in range(depth):
                x = ConvNeXtBlock(dim, self.layer_scale_init_value, name=f"stage{i}_block{j}")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.LayerNorm(epsilon=1e-6, name="norm")(x)
        return nn.Dense(self.num_classes, name="head")(x)


def linen_convnext(layer_scale: bool = True, batch: int = 2):
    """With ``layer_scale``, each block's ``gamma`` is drawn in [0.5, 1.5] (its init,
    1e-6, would make every block nearly the identity, as no trained ConvNeXt is)."""
    model = ConvNeXt(layer_scale_init_value=1e-6 if layer_scale else 0.0)
    x = _images((batch, 16, 16, 3), seed=11)
    variables = randomized(model.init(jax.random.key(11), x), seed=11)
    rng = np.random.default_rng(11)

    def draw_gamma(path, leaf):
        if getattr(path[-1], "key", None) == "gamma":
            return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
        return leaf

    return model, jax.tree_util.tree_map_with_path(draw_gamma, variables), x


# ----------------------------------------------------------------------------- DenseNet
# DenseNet-BC for small images: a 3x3 stem, dense layers BN-ReLU-Conv1x1-BN-ReLU-Conv3x3
# whose output is concatenated to their input, a compressing transition.


class DenseLayer(nn.Module):
    growth_rate: int
    bn_size: int = 4

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, epsilon=1e-5)
        y = nn.relu(norm()(x))
        y = nn.Conv(self.bn_size * self.growth_rate, (1, 1), use_bias=False)(y)
        y = nn.relu(norm()(y))
        y = nn.Conv(self.growth_rate, (3, 3), use_bias=False)(y)
        return jnp.concatenate([x, y], axis=-1)


class DenseBlock(nn.Module):
    num_layers: int
    growth_rate: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        for _ in range(self.num_layers):
            x = DenseLayer(self.growth_rate)(x, train=train)
        return x


class Transition(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        x = nn.relu(x)
        x = nn.Conv(self.features, (1, 1), use_bias=False)(x)
        return nn.avg_pool(x, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
    num_classes: int = 10
    growth_rate: int = 8
    num_layers: int = 3
    compression: float = 0.5

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(2 * self.growth_rate, (3, 3), use_bias=False, name="conv0")(x)
        x = DenseBlock(self.num_layers, self.growth_rate)(x, train=train)
        x = Transition(int(x.shape[-1] * self.compression))(x, train=train)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
        x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)


def linen_densenet(batch: int = 2):
    model = DenseNet()
    x = _images((batch, 16, 16, 3), seed=12)
    variables = model.init(jax.random.key(12), x, train=False)
    return model, randomized(variables, seed=12), x


# ----------------------------------------------------------------------------- U-Net
# Segmentation: logits per pixel, (N, H, W, num_classes).


class DoubleConv(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x, train: bool = True):
        for _ in range(2):
            x = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
            x = nn.relu(x)
        return x


class UNet(nn.Module):
    num_classes: int = 4
    features: Sequence[int] = (8, 16)
    upsample: str = "transpose"  # or "resize": bilinear jax.image.resize, no weights

    @nn.compact
    def __call__(self, x, train: bool = True):
        skips = []
        for f in self.features:
            x = DoubleConv(f)(x, train)
            skips.append(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = DoubleConv(2 * self.features[-1])(x, train)
        for f, skip in zip(reversed(self.features), reversed(skips), strict=True):
            if self.upsample == "transpose":
                up = nn.ConvTranspose(f, (2, 2), strides=(2, 2))(x)
            else:
                n, h, w, c = x.shape
                up = jax.image.resize(x, (n, 2 * h, 2 * w, c), method="bilinear")
            x = jnp.concatenate([up, skip], axis=-1)
            x = DoubleConv(f)(x, train)
        return nn.Conv(self.num_classes, (1, 1), name="head")(x)


def linen_unet(upsample: str = "transpose", batch: int = 2):
    model = UNet(upsample=upsample)
    x = _images((batch, 16, 16, 3), seed=13)
    variables = model.init(jax.random.key(13), x, train=False)
    return model, randomized(variables, seed=13), x


def label_maps(x, num_classes: int = 4, seed: int = 0):
    """Integer labels per pixel for ``x`` (N, H, W, C): (N, H, W)."""
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.integers(0, num_classes, x.shape[:3]), jnp.int32)


# ----------------------------------------------------------------------------- GroupNorm ResNet
# BiT-style: GroupNorm instead of BatchNorm (nothing mutable), and in the second block
# weight-standardized convolutions: each output channel's kernel standardized over
# (H, W, I) before the convolution.


class StdConv(nn.Conv):
    @nn.compact
    def __call__(self, x):
        kernel_size = tuple(self.kernel_size)
        kernel = self.param("kernel", self.kernel_init, kernel_size + (x.shape[-1], self.features))
        mean = jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
        var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
        kernel = (kernel - mean) / jnp.sqrt(var + 1e-10)
        strides = self.strides or (1, 1)
        if isinstance(strides, int):
            strides = (strides, strides)
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            window_strides=strides,
            padding=self.padding,
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        if self.use_bias:
            y = y + self.param("bias", self.bias_init, (self.features,))
        return y


class GNBasicBlock(nn.Module):
    features: int
    strides: int = 1
    conv: Any = nn.Conv

    @nn.compact
    def __call__(self, x):
        gn = partial(nn.GroupNorm, num_groups=4)
        s = (self.strides, self.strides)
        y = self.conv(self.features, (3, 3), strides=s, use_bias=False, name="conv1")(x)
        y = nn.relu(gn(name="gn1")(y))
        y = self.conv(self.features, (3, 3), use_bias=False, name="conv2")(y)
        y = gn(name="gn2")(y)
        if x.shape != y.shape:
            x = self.conv(self.features, (1, 1), strides=s, use_bias=False, name="conv_proj")(x)
            x = gn(name="gn_proj")(x)
        return nn.relu(x + y)


class GroupNormResNet(nn.Module):
    num_classes: int = 10
    widths: Sequence[int] = (16, 32)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(self.widths[0], (3, 3), use_bias=False, name="stem")(x)
        x = nn.relu(nn.GroupNorm(num_groups=4, name="stem_gn")(x))
        x = GNBasicBlock(self.widths[0], name="block1")(x)
        x = GNBasicBlock(self.widths[1], strides=2, conv=StdConv, name="block2")(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)


def linen_groupnorm_resnet(batch: int = 2):
    model = GroupNormResNet()
    x = _images((batch, 16, 16, 3), seed=14)
    variables = model.init(jax.random.key(14), x)
    return model, randomized(variables, seed=14), x


# ----------------------------------------------------------------------------- training steps


# ----------------------------------------------------------------------------- ResNeXt
# Bottleneck blocks with a grouped 3x3 convolution ("cardinality"), as ResNeXt ports write
# them: the group count is an attribute, the widths follow from it.


class ResNeXtBlock(nn.Module):
    features: int
    cardinality: int = 4
    group_width: int = 4

    @nn.compact
    def __call__(self, x, train: bool = True):
        norm = partial(nn.BatchNorm, use_running_average=not train, momentum=0.9)
        width = self.cardinality * self.group_width
        y = nn.relu(norm()(nn.Conv(width, (1, 1), use_bias=False)(x)))
        y = nn.Conv(width, (3, 3), feature_group_count=self.cardinality, use_bias=False)(y)
        y = nn.relu(norm()(y))
        y = norm()(nn.Conv(self.features, (1, 1), use_bias=False)(y))
        return nn.relu(x + y)


class ResNeXt(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
        x = ResNeXtBlock(16)(x, train)
        x = ResNeXtBlock(16, cardinality=2, group_width=8)(x, train)
        return nn.Dense(self.num_classes)(x.mean((1, 2)))


def linen_resnext(batch: int = 2):
    model = ResNeXt()
    x = _images((batch, 16, 16, 3), seed=16)
    variables = model.init(jax.random.key(16), x, train=False)
    return model, randomized(variables, seed=16), x


class TrainState(train_state.TrainState):
    batch_stats: Any = None


def linen_classifier_train_step(model, variables, x, labels):
    """One jitted SGD step with flax's TrainState carrying batch_stats (the flax
    tutorials' way): mutable=["batch_stats"] when the model has BatchNorm, softmax
    cross-entropy. Any classifier here taking ``train``."""
    has_stats = "batch_stats" in variables
    state = TrainState.create(
        apply_fn=model.apply,
        params=variables["params"],
        tx=optax.sgd(0.05, momentum=0.9, nesterov=True),
        batch_stats=variables.get("batch_stats"),
    )

    @jax.jit
    def step(state, images, labels):
        def loss_fn(params):
            if has_stats:
                logits, updates = state.apply_fn(
                    {"params": params, "batch_stats": state.batch_stats},
                    images,
                    train=True,
                    mutable=["batch_stats"],
                )
            else:
                logits, updates = state.apply_fn({"params": params}, images, train=True), {}
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates

        (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        state = state.apply_gradients(grads=grads)
        if has_stats:
            state = state.replace(batch_stats=updates["batch_stats"])
        return state, loss

    state, loss = step(state, x, labels)
    new = {"params": state.params}
    if has_stats:
        new["batch_stats"] = state.batch_stats
    return new, loss


def linen_unet_train_step(model, variables, x, labels):
    """One jitted Adam step of per-pixel cross-entropy; ``labels`` are integer label maps
    (N, H, W) (see ``label_maps``)."""
    tx = optax.adam(1e-3)
    params, batch_stats = variables["params"], variables["batch_stats"]

    @jax.jit
    def step(params, batch_stats, opt_state, images, labels):
        def loss_fn(params):
            logits, updates = model.apply(
                {"params": params, "batch_stats": batch_stats},
                images,
                train=True,
                mutable=["batch_stats"],
            )
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return loss, updates["batch_stats"]

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    params, batch_stats, _, loss = step(params, batch_stats, tx.init(params), x, labels)
    return {"params": params, "batch_stats": batch_stats}, loss


# ----------------------------------------------------------------------------- NNX MobileNetV2
# As the NNX docs write modules; trained with tests.clients.nnx_train_step.


class NnxInvertedResidual(nnx.Module):
    def __init__(
        self, in_features: int, out_features: int, expansion: int, stride: int, *, rngs: nnx.Rngs
    ):
        hidden = in_features * expansion
        self.expand = nnx.data(None)
        if expansion != 1:
            self.expand = nnx.Sequential(
                nnx.Conv(in_features, hidden, (1, 1), use_bias=False, rngs=rngs),
                nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs),
                nnx.relu6,
            )
        self.depthwise = nnx.Conv(
            hidden,
            hidden,
            kernel_size=(3, 3),
            strides=stride,
            feature_group_count=hidden,
            use_bias=False,
            rngs=rngs,
        )
        self.depthwise_bn = nnx.BatchNorm(hidden, momentum=0.9, rngs=rngs)
        self.project = nnx.Conv(hidden, out_features, (1, 1), use_bias=False, rngs=rngs)
        self.project_bn = nnx.BatchNorm(out_features, momentum=0.9, rngs=rngs)
        self.use_residual = stride == 1 and in_features == out_features

    def __call__(self, x):
        y = x if self.expand is None else self.expand(x)
        y = nnx.relu6(self.depthwise_bn(self.depthwise(y)))
        y = self.project_bn(self.project(y))
        return x + y if self.use_residual else y


class NnxMobileNetV2(nnx.Module):
    def __init__(
        self,
        in_features: int = 3,
        num_classes: int = 10,
        stem_features: int = 12,
        block_settings=((1, 8, 1, 1), (4, 12, 2, 2), (4, 16, 2, 1)),
        last_features: int = 32,
        *,
        rngs: nnx.Rngs,
    ):
        self.stem = nnx.Conv(
            in_features, stem_features, (3, 3), strides=2, use_bias=False, rngs=rngs
        )
        self.stem_bn = nnx.BatchNorm(stem_features, momentum=0.9, rngs=rngs)
        blocks, width = [], stem_features
        for t, c, n, s in block_settings:
            for i in range(n):
                blocks.append(NnxInvertedResidual(width, c, t, s if i == 0 else 1, rngs=rngs))
                width = c
        self.blocks = nnx.List(blocks)
        self.last_conv = nnx.Conv(width, last_features, (1, 1), use_bias=False, rngs=rngs)
        self.last_bn = nnx.BatchNorm(last_features, momentum=0.9, rngs=rngs)
        self.classifier = nnx.Linear(last_features, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu6(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        x = nnx.relu6(self.last_bn(self.last_conv(x)))
        return self.classifier(x.mean(axis=(1, 2)))


def nnx_mobilenet(batch: int = 2):
    model = NnxMobileNetV2(rngs=nnx.Rngs(15))
    _randomize_nnx(model, seed=15)
    model.eval()
    return model, _images((batch, 16, 16, 3), seed=15)
