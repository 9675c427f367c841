"""What a loader yields, reduced to the model input."""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

IMAGE_KEYS = ("image", "images", "img", "input", "inputs", "x", "pixel_values")


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
        raise ValueError(f"batch dict has none of the input keys {IMAGE_KEYS}; keys are {sorted(batch)}")
    raise ValueError(f"cannot find the input tensor in a batch of type {type(batch).__name__}: expected a "
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
    """Where a model's tensors live (CPU for a model without any)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    return torch.device("cpu")


def model_inputs(batches: Iterable[Any], device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    for batch in batches:
        x = batch_input(batch)
        yield x if device is None else x.to(device)
