"""What a loader yields, reduced to the model input, and the checks that reject bad batches and
models before any work is done on them."""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator

import torch

from ann2snn.errors import ConversionError, InputError

IMAGE_KEYS = ("image", "images", "img", "input", "inputs", "x", "pixel_values")
_LISTED = 3


def batch_input(batch: Any) -> torch.Tensor:
    """The input tensor of a batch: a tensor, an (x, y, ...) tuple/list, or a dict with an image key."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in IMAGE_KEYS:
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
        raise InputError(f"batch dict has none of the input keys {IMAGE_KEYS}; keys are {sorted(batch)}")
    raise InputError(f"cannot find the input tensor in a batch of type {type(batch).__name__}: expected a "
                     "tensor, an (inputs, labels) tuple/list or a dict with an image key")


def batch_labels(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, (tuple, list)) and len(batch) > 1 and isinstance(batch[1], torch.Tensor):
        return batch[1]
    if isinstance(batch, dict):
        for key in ("label", "labels", "target", "targets", "y"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    return None


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a model's tensors live (CPU for a model without any). A model spread over several devices
    cannot be converted or simulated as one: that is a ConversionError naming where each part is."""
    names_by_device: dict[torch.device, list[str]] = {}
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        names_by_device.setdefault(tensor.device, []).append(name)
    if len(names_by_device) > 1:
        placement = "; ".join(f"{device}: {len(names)} tensors ({_abbreviate(names)})"
                              for device, names in names_by_device.items())
        raise ConversionError(f"the model's parameters and buffers are on several devices ({placement}); "
                              "move the whole model to one device with model.to(device) before converting")
    return next(iter(names_by_device), torch.device("cpu"))


def _abbreviate(names: list[str]) -> str:
    more = len(names) - _LISTED
    return ", ".join(names[:_LISTED]) + (f", ... ({more} more)" if more > 0 else "")


def _size(shape: torch.Size | tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) or "scalar"


def check_input_batch(x: torch.Tensor, where: str, like: torch.Tensor | None = None) -> torch.Tensor:
    """`x` if it is a usable input batch: a non-empty [batch, ...] floating tensor of finite values whose
    samples have the shape of the samples of `like` (an earlier batch); else an InputError about `where`."""
    if not x.is_floating_point():
        raise InputError(f"{where}: inputs are {x.dtype}, not floating point; convert the images to float "
                         "first (e.g. transforms.ToTensor(), or x.float() / 255)")
    if x.dim() < 2 or x.shape[0] == 0:
        raise InputError(f"{where}: expected a non-empty batch of inputs [batch, ...], got shape {tuple(x.shape)}")
    if like is not None and x.shape[1:] != like.shape[1:]:
        raise InputError(f"{where}: inputs of size {_size(x.shape[1:])}, but the first batch had "
                         f"{_size(like.shape[1:])}; every batch must hold inputs of one size")
    if not bool(torch.isfinite(x).all()):
        raise InputError(f"{where}: inputs contain NaN or Inf values")
    return x


def check_model_accepts(model: torch.nn.Module, x: torch.Tensor, hint: str = "") -> torch.Tensor:
    """The model's output for the first sample of `x`, or an InputError when it cannot take such inputs:
    a dtype other than its weights', or a size its layers reject (the message names both and `hint`)."""
    weights_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    if weights_dtype is not None and x.dtype != weights_dtype:
        raise InputError(f"the inputs are {x.dtype} but the model's weights are {weights_dtype}; convert one "
                         f"to the other (x.to({weights_dtype}) or model.to({x.dtype})){hint}")
    try:
        with torch.no_grad():
            return model(x[:1])
    except RuntimeError as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise InputError(f"wrong input size: the model rejects {_size(x.shape[1:])} inputs ({reason}){hint}") from error


def check_labels(labels: torch.Tensor, inputs: int, classes: int, where: str) -> None:
    """Labels must be one integer class index per input, each a valid index of the model's `classes` outputs."""
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool \
            or labels.dim() != 1 or labels.numel() != inputs:
        raise InputError(f"{where}: expected one integer class label per input ({inputs}), got a {labels.dtype} "
                         f"tensor of shape {tuple(labels.shape)}")
    out_of_range = labels[(labels < 0) | (labels >= classes)]
    if out_of_range.numel():
        raise InputError(f"{where}: labels out of range: "
                         f"{_abbreviate([str(v) for v in out_of_range.unique().tolist()])}"
                         f", but the model has {classes} outputs (labels 0..{classes - 1}); check that the data and "
                         "the model have the same classes")


def model_inputs(batches: Iterable[Any], device: torch.device | str | None = None,
                 what: str = "calibration") -> Iterator[torch.Tensor]:
    """The checked input tensor of every batch (see `check_input_batch`), moved to `device`."""
    first = None
    for index, batch in enumerate(batches):
        x = check_input_batch(batch_input(batch), f"{what} batch {index}", first)
        first = x if first is None else first
        yield x if device is None else x.to(device)
