"""A Vision Transformer for CIFAR-sized inputs (patch 4), every width an argument.

Pre-norm encoder blocks built from Flax's own layers, as users write them:
``x + MultiHeadDotProductAttention(LayerNorm(x))`` then ``x + MLP(LayerNorm(x))``, the
MLP ``Dense -> GELU -> Dense``. Patches come from a strided convolution, a learned class
token is concatenated in front of them and a learned position embedding added; the
classifier reads the final LayerNorm of the class token.

Every width a pruned model can have is a field: ``embed_dim`` (the residual stream),
``heads`` (attention heads per block; ``head_dim`` each) and ``mlp_dims`` (hidden units
per block), so :meth:`ViT.for_variables` rebuilds the model of any pruned variables.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: attention then MLP, each added to the stream."""

    heads: int
    head_dim: int
    mlp_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        y = nn.LayerNorm(name="norm1")(x)
        y = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            qkv_features=self.heads * self.head_dim,
            dropout_rate=self.dropout,
            deterministic=not train,
            name="attention",
        )(y, y)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.LayerNorm(name="norm2")(x)
        y = nn.gelu(nn.Dense(self.mlp_dim, name="fc1")(y))
        y = nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.Dense(x.shape[-1], name="fc2")(y)
        return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class ViT(nn.Module):
    """Vision Transformer.

    Attributes:
      num_classes: classifier outputs.
      patch_size: side of the square patches (4: 64 patches of a 32x32 image).
      embed_dim: width of the residual stream.
      heads: attention heads of each block (its length is the depth).
      head_dim: query/key/value width of every head.
      mlp_dims: hidden units of each block's MLP.
      dropout: dropout rate (attention weights, after attention and in the MLP).

    Parameters are named ``patch_embed``, ``cls_token``, ``pos_embed``,
    ``block{i}/{norm1,attention,norm2,fc1,fc2}``, ``norm`` and ``classifier``.
    """

    num_classes: int = 10
    patch_size: int = 4
    embed_dim: int = 128
    heads: Sequence[int] = (4, 4, 4, 4)
    head_dim: int = 32
    mlp_dims: Sequence[int] = (256, 256, 256, 256)
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> jnp.ndarray:
        """Maps images (N, H, W, 3) to logits (N, num_classes)."""
        if len(self.heads) != len(self.mlp_dims):
            raise ValueError(f"heads {self.heads} and mlp_dims {self.mlp_dims} differ in depth")
        p = self.patch_size
        x = nn.Conv(self.embed_dim, (p, p), strides=(p, p), padding="VALID", name="patch_embed")(x)
        x = x.reshape((x.shape[0], -1, x.shape[-1]))
        cls = self.param("cls_token", nn.initializers.zeros, (1, 1, self.embed_dim))
        x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, x.shape[-1])), x], axis=1)
        pos = self.param("pos_embed", nn.initializers.normal(0.02), (1, x.shape[1], self.embed_dim))
        x = nn.Dropout(self.dropout, deterministic=not train)(x + pos)
        for i, (heads, mlp_dim) in enumerate(zip(self.heads, self.mlp_dims, strict=True)):
            x = EncoderBlock(heads, self.head_dim, mlp_dim, self.dropout, name=f"block{i}")(
                x, train
            )
        x = nn.LayerNorm(name="norm")(x[:, 0])
        return nn.Dense(self.num_classes, name="classifier")(x)

    def for_variables(self, variables: Mapping[str, Any]) -> ViT:
        """Returns this model with the widths found in ``variables`` (e.g. after pruning)."""
        params = variables["params"]
        blocks = [params[f"block{i}"] for i in range(len(self.heads))]
        return self.clone(
            embed_dim=params["patch_embed"]["kernel"].shape[-1],
            heads=tuple(b["attention"]["query"]["kernel"].shape[1] for b in blocks),
            head_dim=blocks[0]["attention"]["query"]["kernel"].shape[2]
            if blocks
            else self.head_dim,
            mlp_dims=tuple(b["fc1"]["kernel"].shape[1] for b in blocks),
            num_classes=params["classifier"]["kernel"].shape[-1],
        )


def vit(
    num_classes: int = 10,
    width_multiplier: float = 1.0,
    depth: int = 4,
    embed_dim: int = 128,
    heads: int = 4,
    head_dim: int = 32,
    mlp_dim: int = 256,
    patch_size: int = 4,
) -> ViT:
    """A CIFAR ViT (patch 4, depth 4, width 128, 4 heads of 32, MLP 256) whose stream,
    head count and MLP widths are scaled by ``width_multiplier`` (head_dim is kept)."""
    scale = lambda n: max(1, int(round(n * width_multiplier)))
    return ViT(
        num_classes=num_classes,
        patch_size=patch_size,
        embed_dim=scale(embed_dim),
        heads=(scale(heads),) * depth,
        head_dim=head_dim,
        mlp_dims=(scale(mlp_dim),) * depth,
    )
