"""Flax Linen models: the Intra-Fusion paper's VGG11-BN, CIFAR ResNet18 and ResNet50,
and a CIFAR Vision Transformer."""

from models.layers import configure_xla_cpu
from models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from models.vgg import VGG, VGG11_CFG, vgg11_bn
from models.vit import EncoderBlock, ViT, vit

# Before any computation starts JAX's backends: XLA:CPU flags measured to be faster.
configure_xla_cpu()

__all__ = [
    "VGG",
    "configure_xla_cpu",
    "VGG11_CFG",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet50",
    "vgg11_bn",
    "EncoderBlock",
    "ViT",
    "vit",
]
