"""ResNets: the CIFAR ResNet18 of the Intra-Fusion reference and torchvision's ResNet50.

Every width is a constructor argument so that a pruned parameter tree always has a
model: ``stream_widths`` are the widths of the residual stream of each stage (what the
blocks add into), ``inner_widths`` the widths of the convolutions inside each block
(one per block for basic blocks, two for bottlenecks), ``stem_width`` the stem's output.

A block's first convolution reads the stream, its last one writes it; the first block of
a stage has a projection shortcut (conv 1x1 + BatchNorm) when the stage downsamples or
the block is a bottleneck, decided from the architecture, never from the widths, so a
pruned model keeps its structure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.layers import Conv, max_pool


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    inner_widths: Sequence[int]
    out_width: int
    strides: int
    projection: bool
    use_bias: bool

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        s = (self.strides, self.strides)
        y = Conv(self.inner_widths[0], (3, 3), s, padding=1, use_bias=self.use_bias, name="conv1")(
            x
        )
        y = nn.relu(_batch_norm(train, "bn1")(y))
        y = Conv(self.out_width, (3, 3), padding=1, use_bias=self.use_bias, name="conv2")(y)
        y = _batch_norm(train, "bn2")(y)
        if self.projection:
            x = Conv(
                self.out_width, (1, 1), s, padding=0, use_bias=self.use_bias, name="conv_proj"
            )(x)
            x = _batch_norm(train, "norm_proj")(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1-BN plus shortcut, then ReLU."""

    inner_widths: Sequence[int]
    out_width: int
    strides: int
    projection: bool
    use_bias: bool

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        s = (self.strides, self.strides)
        y = Conv(self.inner_widths[0], (1, 1), padding=0, use_bias=self.use_bias, name="conv1")(x)
        y = nn.relu(_batch_norm(train, "bn1")(y))
        y = Conv(self.inner_widths[1], (3, 3), s, padding=1, use_bias=self.use_bias, name="conv2")(
            y
        )
        y = nn.relu(_batch_norm(train, "bn2")(y))
        y = Conv(self.out_width, (1, 1), padding=0, use_bias=self.use_bias, name="conv3")(y)
        y = _batch_norm(train, "bn3")(y)
        if self.projection:
            x = Conv(
                self.out_width, (1, 1), s, padding=0, use_bias=self.use_bias, name="conv_proj"
            )(x)
            x = _batch_norm(train, "norm_proj")(x)
        return nn.relu(x + y)


_BLOCKS = {"basic": (BasicBlock, 1), "bottleneck": (Bottleneck, 2)}


class ResNet(nn.Module):
    """ResNet with explicit widths.

    Attributes:
      stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet18.
      block: ``"basic"`` or ``"bottleneck"``.
      stem_width: output width of the stem convolution.
      stream_widths: residual-stream width of each stage.
      inner_widths: per block (stages flattened), the widths of its inner convolutions.
      num_classes: classifier outputs.
      cifar_stem: 3x3 stride-1 stem, no stem pool, 4x4 average pool at the end (CIFAR);
        otherwise torchvision's 7x7 stride-2 stem, 3x3 max-pool and global average pool.
      use_bias: whether convolutions have a bias (the CIFAR reference: True).

    Parameters: ``conv_init``/``bn_init`` (stem), ``layer{s}_{b}`` blocks with
    ``conv1``/``bn1``... and ``conv_proj``/``norm_proj``, and ``classifier``.
    """

    stage_sizes: Sequence[int]
    block: str
    stem_width: int
    stream_widths: Sequence[int]
    inner_widths: Sequence[Sequence[int]]
    num_classes: int = 10
    cifar_stem: bool = True
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Maps images (N, H, W, 3) to logits (N, num_classes)."""
        block_cls, _ = _BLOCKS[self.block]
        if self.cifar_stem:
            x = Conv(self.stem_width, (3, 3), padding=1, use_bias=self.use_bias, name="conv_init")(
                x
            )
        else:
            x = Conv(
                self.stem_width, (7, 7), (2, 2), padding=3, use_bias=self.use_bias, name="conv_init"
            )(x)
        x = nn.relu(_batch_norm(train, "bn_init")(x))
        if not self.cifar_stem:
            x = max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        index = 0
        for stage, size in enumerate(self.stage_sizes):
            for b in range(size):
                x = block_cls(
                    inner_widths=tuple(self.inner_widths[index]),
                    out_width=self.stream_widths[stage],
                    strides=2 if (stage > 0 and b == 0) else 1,
                    projection=b == 0 and (stage > 0 or self.block == "bottleneck"),
                    use_bias=self.use_bias,
                    name=f"layer{stage + 1}_{b}",
                )(x, train)
                index += 1
        if self.cifar_stem:
            x = nn.avg_pool(x, (4, 4), strides=(4, 4))
            x = x.reshape((x.shape[0], -1))
        else:
            x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)

    def for_variables(self, variables: Mapping[str, Any]) -> ResNet:
        """Returns this model with the widths found in ``variables`` (e.g. after pruning)."""
        params = variables["params"]
        _, convs = _BLOCKS[self.block]
        stream, inner = [], []
        for stage, size in enumerate(self.stage_sizes):
            for b in range(size):
                block = params[f"layer{stage + 1}_{b}"]
                inner.append(tuple(block[f"conv{i + 1}"]["kernel"].shape[-1] for i in range(convs)))
            stream.append(block[f"conv{convs + 1}"]["kernel"].shape[-1])
        return self.clone(
            stem_width=params["conv_init"]["kernel"].shape[-1],
            stream_widths=tuple(stream),
            inner_widths=tuple(inner),
            num_classes=params["classifier"]["kernel"].shape[-1],
        )


def _scaled(widths: Sequence[int], width_multiplier: float) -> tuple[int, ...]:
    return tuple(max(1, int(round(w * width_multiplier))) for w in widths)


def resnet18(
    num_classes: int = 10,
    width_multiplier: float = 1.0,
    widths: Sequence[int] = (64, 128, 256, 512),
    use_bias: bool = True,
) -> ResNet:
    """CIFAR ResNet18 (basic blocks [2, 2, 2, 2], 3x3 stem, convs with bias)."""
    w = _scaled(widths, width_multiplier)
    return ResNet(
        stage_sizes=(2, 2, 2, 2),
        block="basic",
        stem_width=w[0],
        stream_widths=w,
        inner_widths=tuple((w[s],) for s in range(4) for _ in range(2)),
        num_classes=num_classes,
        cifar_stem=True,
        use_bias=use_bias,
    )


def resnet50(
    num_classes: int = 1000, width_multiplier: float = 1.0, use_bias: bool = False
) -> ResNet:
    """torchvision-layout ResNet50 (bottlenecks [3, 4, 6, 3], 7x7 stem + max-pool)."""
    base = _scaled((64, 128, 256, 512), width_multiplier)
    sizes = (3, 4, 6, 3)
    return ResNet(
        stage_sizes=sizes,
        block="bottleneck",
        stem_width=base[0],
        stream_widths=tuple(4 * b for b in base),
        inner_widths=tuple((base[s], base[s]) for s in range(4) for _ in range(sizes[s])),
        num_classes=num_classes,
        cifar_stem=False,
        use_bias=use_bias,
    )
