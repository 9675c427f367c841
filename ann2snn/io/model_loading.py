"""From a checkpoint file to a model ready to convert, plus the preprocessing its inputs need.

Accepted checkpoints:
* the self-describing format written by `save_checkpoint`: {'format': 'ann2snn-checkpoint', 'version',
  'arch', 'arch_kwargs', 'preprocessing', 'state_dict'};
* a state dict, bare or wrapped ({'state_dict': ...}, DataParallel `module.` prefixes), with the
  architecture given (`arch`: a name of `models.MODELS` or `torchvision:<name>`) or inferred from the
  file name (`resnet20-cifar10.th` -> resnet20);
* a whole pickled module, only with `trust_pickle=True` (unpickling can run arbitrary code).

Every file is read with `torch.load(weights_only=True)` unless `trust_pickle` is set.
"""
from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torchvision.transforms.functional as TF
from torchvision import transforms

from ann2snn.errors import ConversionWarning
from ann2snn.io.atomic import atomic_write
from ann2snn.io.checkpoint import (
    CheckpointError,
    fit_state_dict,
    read_checkpoint,
    state_dict_mismatch,
    state_dict_of,
)
from ann2snn.io.saved_network import FORMAT as SAVED_NETWORK_FORMAT
from ann2snn.zoo import MODELS, TORCHVISION_PREFIX, TRAINED_PREPROCESSING, build_model

CHECKPOINT_FORMAT = "ann2snn-checkpoint"
CHECKPOINT_VERSION = 1
# Checkpoints written before the format carried a version (models/*.pt among them) have version 1's layout.
_UNVERSIONED = 1
DEFAULT_MEAN = (0.485, 0.456, 0.406)
DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = (3, 32, 32)
# A registry name followed by one of these (or the end) starts a file stem: resnet20-cifar10.th.
_STEM_SEPARATORS = "-_."


@dataclass
class Preprocessing:
    """What an image goes through before the model sees it: scaled to [0, 1], checked against
    `image_size` (C, H, W), and normalised by `mean` and `std`. An image of another size or channel count
    is an error, unless `resize`: then it is resized (a non-square one stretched) and converted between
    grayscale and colour (see `ann2snn.io.data.check_image_files`, which warns)."""

    mean: list[float] = field(default_factory=lambda: list(DEFAULT_MEAN))
    std: list[float] = field(default_factory=lambda: list(DEFAULT_STD))
    image_size: list[int] = field(default_factory=lambda: list(DEFAULT_IMAGE_SIZE))
    resize: bool = False

    def __post_init__(self) -> None:
        self.mean = [float(value) for value in self.mean]
        self.std = [float(value) for value in self.std]
        self.image_size = [int(value) for value in self.image_size]
        if len(self.image_size) != 3 or min(self.image_size) < 1:
            raise ValueError(f"image size must be three positive integers C, H, W; got {self.image_size}")
        channels = self.image_size[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean {self.mean} and std {self.std} need one value per channel "
                             f"({channels} for image size {self.image_size})")
        if min(self.std) <= 0:
            raise ValueError(f"std values must be positive, got {self.std}")
        if not isinstance(self.resize, bool):
            raise ValueError(f"resize must be True or False, got {self.resize!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Preprocessing:
        known = {key: values[key] for key in ("mean", "std", "image_size", "resize") if key in values}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        """The record a report and a saved network keep; `resize` only when set, so that records of
        conversions that resize nothing stay as they were."""
        record = asdict(self)
        if not self.resize:
            del record["resize"]
        return record

    def transform(self) -> transforms.Compose:
        return transforms.Compose([_ImageToModelInput(tuple(self.image_size), self.resize),
                                   transforms.Normalize(self.mean, self.std)])


class _ImageToModelInput:
    """PIL image or [C, H, W] tensor in [0, 1] -> float tensor of the model's input size."""

    def __init__(self, image_size: tuple[int, int, int], adapt: bool):
        self.image_size = image_size
        self.adapt = adapt

    def __call__(self, image: Any) -> torch.Tensor:
        tensor = image if isinstance(image, torch.Tensor) else TF.to_tensor(image)
        channels, height, width = self.image_size
        size = "x".join(map(str, tensor.shape))
        if self.adapt and (tensor.shape[0], channels) == (1, 3):
            tensor = tensor.expand(3, -1, -1)
        elif self.adapt and (tensor.shape[0], channels) == (3, 1):
            tensor = TF.rgb_to_grayscale(tensor)
        if tensor.shape[0] != channels:
            raise ValueError(
                f"wrong input size: the data has {tensor.shape[0]}-channel images ({size}) but the model expects "
                f"{channels}x{height}x{width} inputs; check the data (--resize converts grayscale and colour as it is "
                "read), or the image size in the checkpoint's preprocessing (--image-size)")
        if tuple(tensor.shape[1:]) != (height, width):
            if not self.adapt:
                raise ValueError(
                    f"wrong input size: the data has {size} images but the model expects {channels}x{height}x{width} "
                    "inputs; resize the data, pass --resize to have it resized as it is read, or set the model's "
                    "--image-size C,H,W")
            tensor = TF.resize(tensor, [height, width], antialias=True)
        return tensor


@dataclass
class LoadedModel:
    """A model in eval mode with its weights, how it was identified, and its input preprocessing."""

    model: nn.Module
    arch: str
    arch_kwargs: dict[str, Any]
    preprocessing: Preprocessing
    # Where the architecture came from: 'checkpoint', 'argument', 'file name' or 'pickled module'.
    arch_source: str
    # Fine-tuned activation thresholds ({'qbits', 'per_channel', 'thresholds'}), if the checkpoint has them.
    quantization: dict[str, Any] | None = None


def save_checkpoint(model: nn.Module, path: str | Path, arch: str, arch_kwargs: Mapping[str, Any] | None = None,
                    preprocessing: Preprocessing | None = None, quantization: Mapping[str, Any] | None = None,
                    training: Mapping[str, Any] | None = None) -> Path:
    """Write `model`'s weights in the self-describing format, so that `load_model` needs no flags.

    `quantization` ({'qbits', 'per_channel', 'thresholds': {quantizer name: theta}}) comes from
    quantization-aware fine-tuning; `ann2snn convert` then uses these thresholds instead of calibrating.
    `training` records how the weights were obtained (epochs, accuracy, command)."""
    path = Path(path)
    document = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "arch": arch,
        "arch_kwargs": dict(arch_kwargs or {}),
        "preprocessing": (preprocessing or Preprocessing()).to_dict(),
        "state_dict": model.state_dict(),
    }
    if quantization is not None:
        document["quantization"] = dict(quantization)
    if training is not None:
        document["training"] = dict(training)
    serialized = io.BytesIO()
    torch.save(document, serialized)
    atomic_write(path, serialized.getvalue())
    return path


def known_architectures() -> str:
    return f"{', '.join(sorted(MODELS))}, or {TORCHVISION_PREFIX}<name> (e.g. {TORCHVISION_PREFIX}resnet18)"


def _build(arch: str, arch_kwargs: Mapping[str, Any]) -> nn.Module:
    try:
        return build_model(arch, **arch_kwargs)
    except KeyError as error:
        raise ValueError(error.args[0]) from None
    except TypeError as error:
        raise ValueError(f"cannot build {arch} with {dict(arch_kwargs)}: {error}") from None


def _final_linear_key(model: nn.Module) -> str | None:
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    return f"{linears[-1]}.weight" if linears else None


def _kwargs_for(arch: str, state: Mapping[str, torch.Tensor], num_classes: int | None) -> dict[str, Any]:
    """Constructor arguments: num_classes as given, else as the checkpoint's final layer has it."""
    if num_classes is not None:
        return {"num_classes": num_classes}
    key = _final_linear_key(_build(arch, {}))
    if key is not None and key in state and state[key].dim() == 2:
        return {"num_classes": int(state[key].shape[0])}
    return {}


def _stem_candidates(stem: str) -> list[str]:
    """Architecture names a file stem may denote: registry names the stem starts with (resnet56-cifar10 ->
    resnet56), torchvision models it starts with, and the registry's variants of either (resnet56_b,
    shufflenet_v2_x0_5_cifar); registry names extending the stem (mobilenet_v2 -> mobilenet_v2_cifar,
    mobilenet_v2_cifar_s2). Underscores may be left out (shufflenetv2_x0_5 names shufflenet_v2_x0_5)."""
    import torchvision.models

    stem = stem.lower()

    def starts_with(text: str, name: str) -> bool:
        return text == name or (text.startswith(name) and text[len(name)] in _STEM_SEPARATORS)

    def starts_stem(name: str) -> bool:
        return starts_with(stem, name) or starts_with(stem.replace("_", ""), name.replace("_", ""))

    registry = [name for name in MODELS if starts_stem(name)]
    torchvision_names = [name for name in torchvision.models.list_models() if starts_stem(name)]
    variants = [name for name in MODELS if any(name.startswith(match + "_") for match in registry + torchvision_names)]
    extensions = [name for name in MODELS if name.startswith(stem + "_")]
    return list(dict.fromkeys(registry + variants + extensions + [f"{TORCHVISION_PREFIX}{name}"
                                                                   for name in torchvision_names]))


def infer_arch(path: str | Path, state: Mapping[str, torch.Tensor], num_classes: int | None = None) -> str:
    """The one architecture named by the checkpoint's file name whose layers fit the state dict. Several that fit
    are an error: the same layers can compute different things (mobilenet_v2_cifar and torchvision's
    mobilenet_v2 differ only in strides)."""
    stem = Path(path).stem
    candidates = _stem_candidates(stem)
    if not candidates:
        raise CheckpointError(f"{path}: cannot tell the architecture from the file name '{stem}'; pass --arch NAME "
                              f"with NAME one of {known_architectures()}")
    mismatches = {arch: state_dict_mismatch(_build(arch, _kwargs_for(arch, state, num_classes)), state)
                  for arch in candidates}
    fitting = [arch for arch, (misfits, _) in mismatches.items() if not misfits]
    if len(fitting) == 1:
        return fitting[0]
    if fitting:
        raise CheckpointError(f"{path}: the weights fit several architectures its file name suggests "
                              f"({', '.join(fitting)}), which have the same layers but may compute differently "
                              "(strides, padding); pass --arch NAME")
    closest = min(candidates, key=lambda arch: mismatches[arch][0])
    classes = f" with --num-classes {num_classes}" if num_classes is not None else ""
    raise CheckpointError(f"{path}: the weights fit none of the architectures its file name suggests "
                          f"({', '.join(candidates)}); the closest, {closest}{classes}, does not fit them: "
                          f"{mismatches[closest][1]}; if the file holds another architecture, pass --arch NAME with "
                          f"NAME one of {known_architectures()}")


_MODE_DEPENDENT = (nn.modules.batchnorm._NormBase, nn.modules.dropout._DropoutNd)
_LISTED_LAYERS = 3


def _mode_dependent_layers(model: nn.Module) -> list[str]:
    """Names of the layers that compute something else in training mode (BatchNorm, dropout): a saved
    training-mode flag matters only where there are some."""
    names = [name or type(model).__name__ for name, module in model.named_modules()
             if isinstance(module, _MODE_DEPENDENT)]
    return names[:_LISTED_LAYERS] + ([f"{len(names) - _LISTED_LAYERS} more"] if len(names) > _LISTED_LAYERS else [])


def load_model(path: str | Path, *, arch: str | None = None, num_classes: int | None = None,
               preprocessing: Mapping[str, Any] | None = None, trust_pickle: bool = False) -> LoadedModel:
    """Load a checkpoint file (see the module docstring for the accepted forms) into a model.

    `arch` and `num_classes` override what the file says; `preprocessing` entries (mean, std,
    image_size) override the file's, which default to the architecture's `TRAINED_PREPROCESSING`, else to
    `Preprocessing()` (the CIFAR-10 ResNet-20's)."""
    path = Path(path)
    # Read once: with trust_pickle, every read would run the file's pickled code again.
    raw = read_checkpoint(path, trust_pickle=trust_pickle)
    if isinstance(raw, Mapping) and raw.get("format") == SAVED_NETWORK_FORMAT:
        raise CheckpointError(f"{path}: a spiking network converted by ann2snn, not a checkpoint to convert; "
                              "`ann2snn eval` evaluates it, `ann2snn export` writes its ONNX models")
    state = state_dict_of(raw, path)
    described = raw if isinstance(raw, Mapping) and raw.get("format") == CHECKPOINT_FORMAT else {}
    if described and described.get("version", _UNVERSIONED) != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path}: an {CHECKPOINT_FORMAT} file of format version {described['version']}; this "
                              f"ann2snn reads version {CHECKPOINT_VERSION}")
    def resolved_preprocessing(arch: str | None) -> Preprocessing:
        """The user's settings over the file's over the architecture's own (what the zoo model was trained with)."""
        return Preprocessing.from_dict({**TRAINED_PREPROCESSING.get(arch, {}),
                                        **dict(described.get("preprocessing") or {}), **dict(preprocessing or {})})

    if isinstance(raw, nn.Module) and arch is None:
        changing = _mode_dependent_layers(raw) if raw.training else []
        if changing:
            warnings.warn(f"{path}: the pickled model was saved in training mode; converting its eval() form, in "
                          f"which BatchNorm uses its running statistics and dropout is off ({', '.join(changing)})",
                          ConversionWarning, stacklevel=2)
        return LoadedModel(raw.eval(), type(raw).__name__, {}, resolved_preprocessing(None), "pickled module")
    if arch is not None:
        arch_source = "argument"
    elif described:
        if not isinstance(described.get("arch"), str):
            raise CheckpointError(f"{path}: an {CHECKPOINT_FORMAT} file without an architecture name; pass --arch NAME")
        arch, arch_source = described["arch"], "checkpoint"
    else:
        arch, arch_source = infer_arch(path, state, num_classes), "file name"
    arch_kwargs = dict(described.get("arch_kwargs") or {}) if arch_source == "checkpoint" else {}
    if num_classes is not None or not arch_kwargs:
        arch_kwargs.update(_kwargs_for(arch, state, num_classes))
    model = fit_state_dict(_build(arch, arch_kwargs), state, path)
    quantization = described.get("quantization")
    return LoadedModel(model.eval(), arch, arch_kwargs, resolved_preprocessing(arch), arch_source, quantization)
