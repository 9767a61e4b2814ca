"""Loading PyTorch state dicts of the reference architectures into Flax variables.

The Intra-Fusion authors released PyTorch checkpoints of VGG11-BN and CIFAR ResNet18
(and use torchvision's ResNet50). :func:`load_torch_state_dict` takes such a state dict
as a plain mapping of names to numpy arrays (``{k: v.numpy() for k, v in
torch.load(path).items()}``, or ``numpy.load`` of an ``.npz``), so torch itself is not
needed, and returns the variables of the matching Flax model.

Example:
  >>> import numpy as np
  >>> from models import vgg11_bn
  >>> from models.torch_weights import load_torch_state_dict
  >>> model = vgg11_bn()
  >>> state = dict(np.load("vgg11_bn_cifar10.npz"))  # doctest: +SKIP
  >>> model, variables = load_torch_state_dict(model, state)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import numpy as np

from models.resnet import ResNet
from models.vgg import VGG

__all__ = ["load_torch_state_dict", "torch_module_names"]


def _vgg_names(model: VGG) -> dict[str, tuple[str, str]]:
    names, index, conv = {}, 0, 0
    for c in model.cfg:
        if c == "M":
            index += 1
            continue
        names[f"conv{conv}"] = (f"features.{index}", "conv")
        names[f"bn{conv}"] = (f"features.{index + 1}", "bn")
        index += 3
        conv += 1
    names["classifier"] = ("classifier", "dense")
    return names


def _resnet_names(model: ResNet) -> dict[str, tuple[str, str]]:
    cifar = model.cifar_stem
    names = {"conv_init": ("conv1", "conv"), "bn_init": ("bn1", "bn")}
    convs = 2 if model.block == "basic" else 3
    shortcut = "shortcut" if cifar else "downsample"
    for stage, size in enumerate(model.stage_sizes):
        for b in range(size):
            flax_block, torch_block = f"layer{stage + 1}_{b}", f"layer{stage + 1}.{b}"
            for i in range(1, convs + 1):
                names[f"{flax_block}/conv{i}"] = (f"{torch_block}.conv{i}", "conv")
                names[f"{flax_block}/bn{i}"] = (f"{torch_block}.bn{i}", "bn")
            names[f"{flax_block}/conv_proj"] = (f"{torch_block}.{shortcut}.0", "conv")
            names[f"{flax_block}/norm_proj"] = (f"{torch_block}.{shortcut}.1", "bn")
    names["classifier"] = ("linear" if cifar else "fc", "dense")
    return names


def torch_module_names(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Maps Flax module paths ("layer1_0/conv1") to (torch module name, kind).

    ``kind`` is "conv", "bn" or "dense". Paths of optional modules (projection
    shortcuts) are listed whether or not the model has them.
    """
    if isinstance(model, VGG):
        return _vgg_names(model)
    if isinstance(model, ResNet):
        return _resnet_names(model)
    raise ValueError(f"no PyTorch name mapping for model type {type(model).__name__}")


def _dense_kernel(weight: np.ndarray, channels: int) -> np.ndarray:
    """torch Linear weight (out, C*H*W in NCHW order) -> Flax kernel (H*W*C, out)."""
    out, features = weight.shape
    if features == channels:
        return weight.T
    spatial = features // channels
    w = weight.reshape(out, channels, spatial).transpose(2, 1, 0)
    return w.reshape(spatial * channels, out)


def _take(state: Mapping[str, np.ndarray], name: str, used: set[str]) -> np.ndarray:
    if name not in state:
        raise ValueError(f"state dict has no entry {name!r}")
    used.add(name)
    return np.asarray(state[name], dtype=np.float32)


def _module_variables(kind, torch_name, state, used, channels):
    def get(suffix):
        return _take(state, f"{torch_name}.{suffix}", used)

    if kind == "bn":
        params = {"scale": get("weight"), "bias": get("bias")}
        return params, {"mean": get("running_mean"), "var": get("running_var")}
    weight = get("weight")
    kernel = weight.transpose(2, 3, 1, 0) if kind == "conv" else _dense_kernel(weight, channels)
    params = {"kernel": kernel}
    if f"{torch_name}.bias" in state:
        params["bias"] = get("bias")
    return params, None


def _set(tree: dict, path: str, value: dict) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def load_torch_state_dict(
    model: nn.Module, state_dict: Mapping[str, np.ndarray], *, strict: bool = True
) -> tuple[nn.Module, dict]:
    """Converts a PyTorch state dict of a reference architecture to Flax variables.

    Args:
      model: a :class:`models.VGG` or :class:`models.ResNet` of the same architecture
        (its widths need not match: the returned model is rebuilt from the weights).
      state_dict: torch parameter names -> numpy arrays in torch layouts (conv weight
        (out, in, kh, kw), linear weight (out, in), BatchNorm weight/bias/running stats).
        ``num_batches_tracked`` entries are ignored.
      strict: raise if the state dict has entries the model does not use.

    Returns:
      ``(model, variables)`` with ``variables = {"params": ..., "batch_stats": ...}``.
    """
    params, stats, used = {}, {}, set()
    channels = None
    for path, (torch_name, kind) in torch_module_names(model).items():
        if f"{torch_name}.weight" not in state_dict and path.endswith(("_proj",)):
            continue
        p, s = _module_variables(kind, torch_name, state_dict, used, channels)
        if kind == "conv":
            channels = p["kernel"].shape[-1]
        _set(params, path, p)
        if s is not None:
            _set(stats, path, s)
    unused = [k for k in state_dict if k not in used and not k.endswith("num_batches_tracked")]
    if strict and unused:
        raise ValueError(f"state dict entries not used by {type(model).__name__}: {unused[:5]}")
    variables = {"params": params, "batch_stats": stats}
    return model.for_variables(variables), variables
