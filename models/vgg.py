"""VGG with BatchNorm, CIFAR layout (as in the Intra-Fusion reference code).

Convolutions are 3x3 with padding 1 (bias configurable, the reference uses bias), each
followed by BatchNorm and ReLU; ``"M"`` entries are 2x2 max-pools
(``models.layers.max_pool``: ``nn.max_pool`` with a faster gradient on CPU). The
classifier is one Dense layer on the flattened final feature map (1x1 for 32x32 inputs).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from models.layers import Conv, max_pool

VGG11_CFG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


def scale_widths(cfg: Sequence[int | str], width_multiplier: float) -> tuple[int | str, ...]:
    """Scales every width of a VGG cfg, keeping at least one channel per layer."""
    return tuple(c if c == "M" else max(1, int(round(int(c) * width_multiplier))) for c in cfg)


class VGG(nn.Module):
    """VGG-BN for CIFAR-sized inputs.

    Attributes:
      cfg: layer widths, with ``"M"`` for a 2x2 max-pool.
      num_classes: classifier outputs.
      use_bias: whether convolutions have a bias (the reference: True).

    Parameters are named ``conv{i}``/``bn{i}`` for the i-th convolution and
    ``classifier`` for the final Dense layer.
    """

    cfg: Sequence[int | str] = VGG11_CFG
    num_classes: int = 10
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Maps images (N, H, W, 3) to logits (N, num_classes)."""
        index = 0
        for c in self.cfg:
            if c == "M":
                x = max_pool(x, (2, 2), strides=(2, 2))
                continue
            x = Conv(int(c), (3, 3), padding=1, use_bias=self.use_bias, name=f"conv{index}")(x)
            x = nn.BatchNorm(
                use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{index}"
            )(x)
            x = nn.relu(x)
            index += 1
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(self.num_classes, name="classifier")(x)

    def for_variables(self, variables: Mapping[str, Any]) -> VGG:
        """Returns this model with the widths found in ``variables`` (e.g. after pruning)."""
        params = variables["params"]
        widths = iter(params[f"conv{i}"]["kernel"].shape[-1] for i in range(self.num_convs))
        cfg = tuple(c if c == "M" else next(widths) for c in self.cfg)
        return self.clone(cfg=cfg, num_classes=params["classifier"]["kernel"].shape[-1])

    @property
    def num_convs(self) -> int:
        return sum(1 for c in self.cfg if c != "M")


def vgg11_bn(num_classes: int = 10, width_multiplier: float = 1.0, use_bias: bool = True) -> VGG:
    """VGG11-BN (cfg 64,M,128,M,256,256,M,512,512,M,512,512,M) with scaled widths."""
    return VGG(
        cfg=scale_widths(VGG11_CFG, width_multiplier), num_classes=num_classes, use_bias=use_bias
    )
