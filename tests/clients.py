"""Client models: written here the way users write Flax models (flax's examples, the NNX
docs), not taken from ifjax's own ``models/``. Each comes with an input, variables and
one training step of the kind its users write."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from tests.conftest import randomized

ModuleDef = Any

# ----------------------------------------------------------------------------- Linen ResNet
# In the style of flax's examples/imagenet: conv and norm injected as partials, BatchNorm
# with axis_name="batch", train=True by default, auto-named blocks and convolutions.


class ResNetBlock(nn.Module):
    filters: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    strides: tuple[int, int] = (1, 1)

    @nn.compact
    def __call__(self, x):
        residual = x
        y = self.conv(self.filters, (3, 3), self.strides)(x)
        y = self.norm()(y)
        y = self.act(y)
        y = self.conv(self.filters, (3, 3))(y)
        y = self.norm(scale_init=nn.initializers.zeros_init())(y)
        if residual.shape != y.shape:
            residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
            residual = self.norm(name="norm_proj")(residual)
        return self.act(residual + y)


class ResNet(nn.Module):
    stage_sizes: Sequence[int]
    num_classes: int
    num_filters: int = 8
    dtype: Any = jnp.float32
    act: Callable = nn.relu

    @nn.compact
    def __call__(self, x, train: bool = True):
        conv = partial(nn.Conv, use_bias=False, dtype=self.dtype)
        norm = partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=0.9,
            epsilon=1e-5,
            dtype=self.dtype,
            axis_name="batch",
        )
        x = conv(self.num_filters, (3, 3), name="conv_init")(x)
        x = norm(name="bn_init")(x)
        x = nn.relu(x)
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="SAME")
        for i, block_size in enumerate(self.stage_sizes):
            for j in range(block_size):
                strides = (2, 2) if i > 0 and j == 0 else (1, 1)
                x = ResNetBlock(
                    self.num_filters * 2**i, conv=conv, norm=norm, act=self.act, strides=strides
                )(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, dtype=self.dtype)(x)


def linen_resnet():
    model = ResNet(stage_sizes=(2, 1), num_classes=10)
    x = _images((8, 16, 16, 3), seed=0)
    variables = model.init(jax.random.key(0), x, train=False)
    return model, randomized(variables), x


def linen_resnet_train_step(model, variables, x, labels):
    """One SGD step as flax's examples write it: vmapped over devices (axis "batch"),
    BatchNorm statistics updated with mutable=["batch_stats"]."""
    tx = optax.sgd(0.1, momentum=0.9)
    params, batch_stats = variables["params"], variables["batch_stats"]
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats, images, labels):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, updates["batch_stats"]

    def step(params, batch_stats, opt_state, images, labels):
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, batch_stats), grads = grad_fn(params, batch_stats, images, labels)
        grads = jax.lax.pmean(grads, "batch")
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    devices = 2
    images = x.reshape((devices, -1) + x.shape[1:])
    labels = labels.reshape(devices, -1)
    stepped = jax.jit(jax.vmap(step, in_axes=(None, None, None, 0, 0), axis_name="batch"))(
        params, batch_stats, opt_state, images, labels
    )
    new_params, new_stats, _, loss = stepped
    return {"params": jax.tree.map(lambda p: p[0], new_params)}, loss


# ----------------------------------------------------------------------------- Linen Sequential


class SequentialNet(nn.Module):
    """A feature extractor in nn.Sequential, dropout, global mean pooling, a Dense head."""

    num_classes: int = 10

    def setup(self):
        self.features = nn.Sequential(
            [
                nn.Conv(12, (3, 3)),
                nn.relu,
                partial(nn.avg_pool, window_shape=(2, 2), strides=(2, 2)),
                nn.Conv(16, (3, 3), use_bias=False),
                nn.gelu,
                nn.Conv(16, (3, 3)),
                nn.swish,
            ]
        )
        self.dropout = nn.Dropout(0.1)
        self.hidden = nn.Dense(24)
        self.head = nn.Dense(self.num_classes)

    def __call__(self, x, deterministic: bool = True):
        x = self.features(x)
        x = x.mean(axis=(1, 2))
        x = self.dropout(nn.relu(self.hidden(x)), deterministic=deterministic)
        return self.head(x)


def linen_sequential():
    model = SequentialNet()
    x = _images((8, 16, 16, 3), seed=1)
    return model, randomized(model.init(jax.random.key(1), x)), x


def linen_sequential_train_step(model, variables, x, labels):
    """One Adam step with dropout on (a ``dropout`` rng)."""
    tx = optax.adam(1e-2)
    params = variables["params"]

    @jax.jit
    def step(params, opt_state, key):
        def loss_fn(params):
            logits = model.apply({"params": params}, x, deterministic=False, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), loss

    new_params, loss = step(params, tx.init(params), jax.random.key(2))
    return {"params": new_params}, loss


# ----------------------------------------------------------------------------- Linen CNN
# A plain CNN with the `train` convention and no named axis: what ifjax's own training
# loops (train/training.py, train/split.py) call.


class SmallCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
        x = nn.Conv(16, (3, 3), use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Conv(32, (3, 3), strides=2, use_bias=False)(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train)(x))
        x = nn.Dropout(0.2, deterministic=not train)(x.mean(axis=(1, 2)))
        return nn.Dense(10)(x)


# ----------------------------------------------------------------------------- NNX CNN
# In the style of flax's NNX MNIST tutorial, with BatchNorm and Dropout added.


class CNN(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(1, 8, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(16, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(7 * 7 * 16, 32, rngs=rngs)
        self.dropout = nnx.Dropout(rate=0.25, rngs=rngs)
        self.linear2 = nnx.Linear(32, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.conv1(x))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = self.dropout(nnx.relu(self.linear1(x)))
        return self.linear2(x)


def nnx_cnn():
    model = CNN(rngs=nnx.Rngs(0))
    _randomize_nnx(model)
    model.eval()
    return model, _images((8, 28, 28, 1), seed=2)


# ----------------------------------------------------------------------------- NNX ResNet


class Block(nnx.Module):
    def __init__(self, in_features: int, features: int, stride: int, *, rngs: nnx.Rngs):
        self.conv1 = nnx.Conv(
            in_features, features, (3, 3), strides=stride, use_bias=False, rngs=rngs
        )
        self.bn1 = nnx.BatchNorm(features, rngs=rngs)
        self.conv2 = nnx.Conv(features, features, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(features, rngs=rngs)
        self.shortcut = nnx.data(None)
        if stride != 1 or in_features != features:
            self.shortcut = nnx.Sequential(
                nnx.Conv(in_features, features, (1, 1), strides=stride, use_bias=False, rngs=rngs),
                nnx.BatchNorm(features, rngs=rngs),
            )

    def __call__(self, x):
        y = nnx.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        residual = x if self.shortcut is None else self.shortcut(x)
        return nnx.relu(y + residual)


class NnxResNet(nnx.Module):
    def __init__(self, widths=(8, 16), num_classes: int = 10, *, rngs: nnx.Rngs):
        self.stem = nnx.Conv(3, widths[0], (3, 3), use_bias=False, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(widths[0], rngs=rngs)
        blocks, width = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(Block(width, w, 1 if i == 0 else 2, rngs=rngs))
            blocks.append(Block(w, w, 1, rngs=rngs))
            width = w
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(width, num_classes, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.stem_bn(self.stem(x)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


def nnx_resnet():
    model = NnxResNet(rngs=nnx.Rngs(3))
    _randomize_nnx(model)
    model.eval()
    return model, _images((8, 16, 16, 3), seed=3)


def nnx_train_step(model, x, labels):
    """One step as the NNX docs write it: nnx.Optimizer, nnx.jit, nnx.value_and_grad."""
    model.train()
    optimizer = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, labels):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    loss = step(model, optimizer, x, labels)
    model.eval()
    return loss


# ----------------------------------------------------------------------------- transformers
# A Linen ViT as big_vision/scenic write it (flax's MultiHeadDotProductAttention, MlpBlock,
# a class token concatenated in front of the patches, a learned position embedding); the
# same with attention written by hand (Dense, reshape into heads, einsum); an NNX ViT as
# the NNX docs write modules (nnx.MultiHeadAttention).


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.mlp_dim)(x))
        return nn.Dense(x.shape[-1])(y)


class SelfAttention(nn.Module):
    """Hand-written multi-head attention: one Dense per projection, heads by reshape."""

    num_heads: int
    head_dim: int

    @nn.compact
    def __call__(self, x):
        batch, tokens, width = x.shape
        split = lambda y: y.reshape(batch, tokens, self.num_heads, self.head_dim)
        q = split(nn.Dense(self.num_heads * self.head_dim, name="q")(x))
        k = split(nn.Dense(self.num_heads * self.head_dim, name="k")(x))
        v = split(nn.Dense(self.num_heads * self.head_dim, name="v")(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(self.head_dim)
        weights = jax.nn.softmax(logits, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, -1)
        return nn.Dense(width, name="proj")(y)


class Encoder1DBlock(nn.Module):
    num_heads: int
    mlp_dim: int
    hand_written: bool = False

    @nn.compact
    def __call__(self, x, deterministic=True):
        y = nn.LayerNorm()(x)
        if self.hand_written:
            y = SelfAttention(self.num_heads, x.shape[-1] // self.num_heads)(y)
        else:
            y = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)(
                y, y, deterministic=deterministic
            )
        x = x + y
        return x + MlpBlock(self.mlp_dim)(nn.LayerNorm()(x))


class VisionTransformer(nn.Module):
    num_classes: int = 10
    patch: int = 4
    hidden: int = 16
    depth: int = 2
    num_heads: int = 4
    mlp_dim: int = 24
    hand_written: bool = False

    @nn.compact
    def __call__(self, x, train=False):
        p = self.patch
        x = nn.Conv(self.hidden, (p, p), strides=(p, p), padding="VALID", name="embedding")(x)
        n, h, w, c = x.shape
        x = x.reshape(n, h * w, c)
        cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, c))
        x = jnp.concatenate([jnp.tile(cls, [n, 1, 1]), x], axis=1)
        x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, h * w + 1, c))
        for i in range(self.depth):
            x = Encoder1DBlock(self.num_heads, self.mlp_dim, self.hand_written, name=f"block{i}")(
                x, deterministic=not train
            )
        x = nn.LayerNorm(name="encoder_norm")(x)
        return nn.Dense(self.num_classes, name="head")(x[:, 0])


def linen_vit(hand_written=False):
    model = VisionTransformer(hand_written=hand_written)
    x = _images((4, 16, 16, 3), seed=4)
    variables = model.init(jax.random.key(4), x)
    return model, randomized(variables, seed=4), x


def linen_vit_train_step(model, variables, x, labels):
    """One jitted AdamW step, as a user of the Linen ViT writes it."""
    tx = optax.adamw(1e-3)
    params = variables["params"]

    @jax.jit
    def step(params, opt_state):
        def loss_fn(params):
            logits = model.apply({"params": params}, x, train=True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params, _, loss = step(params, tx.init(params))
    return {"params": params}, loss


class NnxEncoderBlock(nnx.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_dim: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(hidden, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(
            num_heads=num_heads, in_features=hidden, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(hidden, rngs=rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(hidden, mlp_dim, rngs=rngs), nnx.gelu, nnx.Linear(mlp_dim, hidden, rngs=rngs)
        )

    def __call__(self, x):
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class NnxViT(nnx.Module):
    def __init__(self, hidden=16, depth=2, num_heads=4, mlp_dim=24, num_classes=10, *, rngs):
        self.patch_embed = nnx.Conv(3, hidden, (4, 4), strides=(4, 4), padding="VALID", rngs=rngs)
        self.cls_token = nnx.Param(jax.random.normal(rngs.params(), (1, 1, hidden)) * 0.02)
        self.pos_embed = nnx.Param(jax.random.normal(rngs.params(), (1, 17, hidden)) * 0.02)
        self.blocks = nnx.List(
            [NnxEncoderBlock(hidden, num_heads, mlp_dim, rngs=rngs) for _ in range(depth)]
        )
        self.norm = nnx.LayerNorm(hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, num_classes, rngs=rngs)

    def __call__(self, x):
        x = self.patch_embed(x)
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        cls = jnp.broadcast_to(self.cls_token[...], (x.shape[0], 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


def nnx_vit():
    model = NnxViT(rngs=nnx.Rngs(5))
    _randomize_nnx(model, seed=5)
    model.eval()
    return model, _images((4, 16, 16, 3), seed=5)


# ----------------------------------------------------------------------------- helpers


def _images(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _randomize_nnx(module, seed=0):
    state = nnx.state(module, (nnx.Param, nnx.BatchStat))
    nnx.update(module, randomized(state, seed))
