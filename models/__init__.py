"""Flax Linen models: the Intra-Fusion paper's VGG11-BN, CIFAR ResNet18 and ResNet50,
a CIFAR Vision Transformer and a CIFAR MobileNetV2."""

from models.layers import configure_xla_cpu, install_depthwise_lowering
from models.mobilenet import InvertedResidual, MobileNetV2, mobilenetv2
from models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from models.vgg import VGG, VGG11_CFG, vgg11_bn
from models.vit import EncoderBlock, ViT, vit

# Before any computation starts JAX's backends: XLA:CPU flags measured to be faster.
configure_xla_cpu()
# XLA:CPU computes depthwise convolutions (MobileNetV2's) as shifted slices: 50x faster.
install_depthwise_lowering()

__all__ = [
    "VGG",
    "configure_xla_cpu",
    "install_depthwise_lowering",
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
    "InvertedResidual",
    "MobileNetV2",
    "mobilenetv2",
]
