"""Layers shared by the models."""

from __future__ import annotations

import flax.linen as nn

# A plain alias for now; the models build every convolution through it so a faster
# implementation can be swapped in in one place.
Conv = nn.Conv
