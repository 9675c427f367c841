"""Model zoo: CIFAR-sized networks by name, plus any torchvision classification model."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from ann2snn.zoo import cifar_resnet_b, shufflenet_v2_cifar
from ann2snn.zoo.cifar_resnet import resnet20, resnet32, resnet44, resnet56
from ann2snn.zoo.cifar_resnet_b import resnet20_b, resnet32_b, resnet44_b, resnet56_b
from ann2snn.zoo.mobilenet_v2_cifar import mobilenet_v2_cifar, mobilenet_v2_cifar_s2
from ann2snn.zoo.shufflenet_v2_cifar import shufflenet_v2_x0_5_cifar, shufflenet_v2_x1_0_cifar
from ann2snn.zoo.vgg_cifar import vgg11_bn_cifar, vgg16_bn_cifar

__all__ = ["MODELS", "TORCHVISION_PREFIX", "TRAINED_PREPROCESSING", "build_model"]

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet20,
    "resnet32": resnet32,
    "resnet44": resnet44,
    "resnet56": resnet56,
    "resnet20_b": resnet20_b,
    "resnet32_b": resnet32_b,
    "resnet44_b": resnet44_b,
    "resnet56_b": resnet56_b,
    "mobilenet_v2_cifar": mobilenet_v2_cifar,
    "mobilenet_v2_cifar_s2": mobilenet_v2_cifar_s2,
    "shufflenet_v2_x0_5_cifar": shufflenet_v2_x0_5_cifar,
    "shufflenet_v2_x1_0_cifar": shufflenet_v2_x1_0_cifar,
    "vgg11_bn_cifar": vgg11_bn_cifar,
    "vgg16_bn_cifar": vgg16_bn_cifar,
}

# The input normalisation of the public checkpoints an architecture was written for, where it is not the
# default (ImageNet's mean and std): a plain state dict of such a model converts with it unless told otherwise.
TRAINED_PREPROCESSING: dict[str, dict[str, list]] = {
    **dict.fromkeys(["resnet20_b", "resnet32_b", "resnet44_b", "resnet56_b"], cifar_resnet_b.PREPROCESSING),
    **dict.fromkeys(["shufflenet_v2_x0_5_cifar", "shufflenet_v2_x1_0_cifar"], shufflenet_v2_cifar.PREPROCESSING),
}

TORCHVISION_PREFIX = "torchvision:"


def build_model(name: str, **kwargs: object) -> nn.Module:
    """Build a randomly initialised model from MODELS, or `torchvision:<name>` (e.g. torchvision:resnet18).

    Keyword arguments such as num_classes go to the constructor. torchvision models
    are built with weights=None: pretrained weights are loaded from a checkpoint
    file instead, never downloaded.
    """
    if name.startswith(TORCHVISION_PREFIX):
        return _build_torchvision_model(name.removeprefix(TORCHVISION_PREFIX), kwargs)
    try:
        constructor = MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise KeyError(
            f"unknown model {name!r}; known models: {known}, or {TORCHVISION_PREFIX}<name> "
            f"for a torchvision model (e.g. {TORCHVISION_PREFIX}resnet18)"
        ) from None
    return constructor(**kwargs)


def _build_torchvision_model(name: str, kwargs: dict[str, object]) -> nn.Module:
    # Imported here: torchvision.models is slow to import and only this path needs it.
    import torchvision.models

    if name not in torchvision.models.list_models():
        raise KeyError(
            f"unknown torchvision model {name!r} in {TORCHVISION_PREFIX}{name}; "
            "torchvision.models.list_models() lists the available names"
        )
    return torchvision.models.get_model(name, weights=None, **kwargs)
