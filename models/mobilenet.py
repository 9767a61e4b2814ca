"""MobileNetV2 for CIFAR-sized inputs (32x32), every width an argument.

The network of Sandler et al. (2018) with the usual CIFAR changes: a 3x3 stride-1 stem
and the second stage at stride 1 (the stride-2 stages are the 32-, 64- and 160-channel
ones, so a 32x32 image ends as a 4x4 map). The stem is conv3x3-BN-ReLU6; each inverted
residual block is

* a 1x1 expand convolution + BN + ReLU6 (absent in blocks of expansion 1, whose depthwise
  convolution reads the block's input directly),
* a 3x3 depthwise convolution (``feature_group_count`` equal to its channels, kernel
  (3, 3, 1, C)) + BN + ReLU6, strided in the first block of a stage,
* a 1x1 linear project convolution + BN,

plus the block's input when it has a residual connection (stride 1 and as many output
channels as input channels, decided from the architecture, never from the widths, so a
pruned model keeps its structure). A final 1x1 convolution + BN + ReLU6, a global
average pool and a Dense classifier follow.

Every width a pruned model can have is a field: ``stem``, per block ``hidden`` (the
expand/depthwise width) and ``outs`` (the project width), and ``head``, so
:meth:`MobileNetV2.for_variables` rebuilds the model of any pruned variables. The
convolutions are :class:`models.layers.Conv`; a depthwise one is ``nn.Conv``'s
``lax.conv_general_dilated`` with ``feature_group_count`` (what ``ifjax`` analyses), which
XLA:CPU computes as shifted slices (:func:`models.layers.install_depthwise_lowering`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.layers import Conv

#: (expansion t, output channels c, blocks n, stride s of the first block) per stage: the
#: paper's configuration with the second stage at stride 1 for 32x32 inputs.
CIFAR_CONFIG = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _batch_norm(train: bool, name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


class InvertedResidual(nn.Module):
    """[conv1x1-BN-ReLU6] - depthwise conv3x3(stride)-BN-ReLU6 - conv1x1-BN [+ input]."""

    hidden: int
    out_width: int
    strides: int
    expand: bool
    residual: bool
    use_bias: bool

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        y = x
        if self.expand:
            y = Conv(self.hidden, (1, 1), padding=0, use_bias=self.use_bias, name="conv_expand")(y)
            y = nn.relu6(_batch_norm(train, "bn_expand")(y))
        elif y.shape[-1] != self.hidden:
            raise ValueError(
                f"{self.name}: a block without expand convolution has hidden width equal to "
                f"its input's, got hidden {self.hidden} for {y.shape[-1]} input channels"
            )
        s = (self.strides, self.strides)
        y = Conv(
            self.hidden,
            (3, 3),
            s,
            padding=1,
            feature_group_count=self.hidden,
            use_bias=self.use_bias,
            name="conv_dw",
        )(y)
        y = nn.relu6(_batch_norm(train, "bn_dw")(y))
        y = Conv(self.out_width, (1, 1), padding=0, use_bias=self.use_bias, name="conv_project")(y)
        y = _batch_norm(train, "bn_project")(y)
        return x + y if self.residual else y


class MobileNetV2(nn.Module):
    """MobileNetV2 with explicit widths.

    Attributes:
      stem: output width of the stem convolution.
      hidden: per block, the width of its expand and depthwise convolutions (for a block
        without expand convolution, its input width).
      outs: per block, the width of its project convolution (its output).
      strides: per block, the stride of its depthwise convolution.
      expand: per block, whether it has an expand convolution (expansion ratio not 1).
      residual: per block, whether its input is added to its output.
      head: width of the final 1x1 convolution.
      num_classes: classifier outputs.
      use_bias: whether convolutions have a bias (MobileNetV2: False, BN follows each).

    Parameters are named ``conv_init``/``bn_init`` (stem), ``block{i}`` with
    ``conv_expand``/``bn_expand``, ``conv_dw``/``bn_dw`` and ``conv_project``/
    ``bn_project``, ``conv_head``/``bn_head`` and ``classifier``.
    """

    stem: int = 32
    hidden: Sequence[int] = (32,)
    outs: Sequence[int] = (16,)
    strides: Sequence[int] = (1,)
    expand: Sequence[bool] = (False,)
    residual: Sequence[bool] = (False,)
    head: int = 1280
    num_classes: int = 10
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Maps images (N, H, W, 3) to logits (N, num_classes)."""
        per_block = (self.hidden, self.outs, self.strides, self.expand, self.residual)
        if len({len(field) for field in per_block}) != 1:
            raise ValueError(
                f"hidden {self.hidden}, outs {self.outs}, strides {self.strides}, expand "
                f"{self.expand} and residual {self.residual} differ in depth"
            )
        x = Conv(self.stem, (3, 3), padding=1, use_bias=self.use_bias, name="conv_init")(x)
        x = nn.relu6(_batch_norm(train, "bn_init")(x))
        for i, (hidden, out, strides, expand, residual) in enumerate(zip(*per_block, strict=True)):
            x = InvertedResidual(
                hidden=hidden,
                out_width=out,
                strides=strides,
                expand=expand,
                residual=residual,
                use_bias=self.use_bias,
                name=f"block{i}",
            )(x, train)
        x = Conv(self.head, (1, 1), padding=0, use_bias=self.use_bias, name="conv_head")(x)
        x = nn.relu6(_batch_norm(train, "bn_head")(x))
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="classifier")(x)

    def for_variables(self, variables: Mapping[str, Any]) -> MobileNetV2:
        """Returns this model with the widths found in ``variables`` (e.g. after pruning)."""
        params = variables["params"]
        blocks = [params[f"block{i}"] for i in range(len(self.hidden))]
        return self.clone(
            stem=params["conv_init"]["kernel"].shape[-1],
            hidden=tuple(b["conv_dw"]["kernel"].shape[-1] for b in blocks),
            outs=tuple(b["conv_project"]["kernel"].shape[-1] for b in blocks),
            head=params["conv_head"]["kernel"].shape[-1],
            num_classes=params["classifier"]["kernel"].shape[-1],
        )


def make_divisible(value: float, divisor: int = 8) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``),
    never more than 10% below ``value`` (the rounding of the MobileNet papers)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


# A small MobileNetV2-style network for a 2-core CPU: one to two blocks per stage, the
# second stage strided (16x16 from there on), the head 640 wide.
SMALL_CONFIG = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 2, 2),
    (6, 64, 2, 2),
    (6, 96, 1, 1),
    (6, 160, 1, 2),
    (6, 320, 1, 1),
)


def mobilenetv2_small(num_classes: int = 10, width_multiplier: float = 1.0) -> MobileNetV2:
    """The small MobileNetV2 of :data:`SMALL_CONFIG` (10 blocks, head 640)."""
    return mobilenetv2(num_classes, width_multiplier, config=SMALL_CONFIG, head=640)


def mobilenetv2(
    num_classes: int = 10,
    width_multiplier: float = 1.0,
    config: Sequence[tuple[int, int, int, int]] = CIFAR_CONFIG,
    stem: int = 32,
    head: int = 1280,
    use_bias: bool = False,
) -> MobileNetV2:
    """CIFAR MobileNetV2 (stem 32, the stages of :data:`CIFAR_CONFIG`, head 1280).

    The stem and stage widths are scaled by ``width_multiplier`` and rounded to multiples
    of 8 (at least 8); the head is scaled only when ``width_multiplier`` > 1, as in the
    paper. A block's hidden width is its input width times the stage's expansion.
    ``config`` gives other (t, c, n, s) stages, e.g. a shallower network.

    Example:
      >>> mobilenetv2(width_multiplier=0.5).outs[:3]
      (8, 16, 16)
    """
    width = make_divisible(stem * width_multiplier)
    model = dict(stem=width, hidden=[], outs=[], strides=[], expand=[], residual=[])
    for t, c, n, s in config:
        out = make_divisible(c * width_multiplier)
        for b in range(n):
            stride = s if b == 0 else 1
            model["hidden"].append(int(round(width * t)))
            model["outs"].append(out)
            model["strides"].append(stride)
            model["expand"].append(t != 1)
            model["residual"].append(stride == 1 and width == out)
            width = out
    return MobileNetV2(
        **{k: v if isinstance(v, int) else tuple(v) for k, v in model.items()},
        head=make_divisible(head * max(1.0, width_multiplier)),
        num_classes=num_classes,
        use_bias=use_bias,
    )
