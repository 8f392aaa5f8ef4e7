"""One generic Flax module per family; the variants are data in ``jaxnets.registry``."""

from jaxnets.models.alexnet import AlexNet
from jaxnets.models.googlenet import GoogLeNet, GoogLeNetOutputs
from jaxnets.models.resnet import BasicBlock, Bottleneck, ResNet
from jaxnets.models.vgg import VGG

__all__ = ["AlexNet", "BasicBlock", "Bottleneck", "GoogLeNet", "GoogLeNetOutputs", "ResNet", "VGG"]
