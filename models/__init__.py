"""Flax Linen models of the Intra-Fusion paper: VGG11-BN, CIFAR ResNet18, ResNet50."""

from models.resnet import BasicBlock, Bottleneck, ResNet, resnet18, resnet50
from models.vgg import VGG, VGG11_CFG, vgg11_bn

__all__ = [
    "VGG",
    "VGG11_CFG",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "resnet18",
    "resnet50",
    "vgg11_bn",
]
