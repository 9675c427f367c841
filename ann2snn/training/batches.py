"""Training batches from an image data set held in memory as uint8: decoding 50,000 JPEGs once instead of
once per epoch, and the standard CIFAR augmentation (random crop from a 4-pixel zero padding, horizontal
flip) applied to whole batches, keep a CPU busy with the network rather than with image files."""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import PILToTensor
from tqdm import tqdm


def decode_images(dataset: Dataset, *, progress: bool = True, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """All images of `dataset` (which yields (PIL image, label) with no transform) as uint8 [N, C, H, W]
    and their labels as int64 [N]."""
    if getattr(dataset, "transform", None) is not None:
        raise ValueError("decode_images needs the data set without a transform: it decodes to uint8 itself")
    dataset.transform = PILToTensor()
    try:
        images, labels = [], []
        for image_batch, label_batch in tqdm(DataLoader(dataset, batch_size=batch_size), desc="decoding images",
                                             unit="batch", disable=not progress, leave=False):
            images.append(image_batch)
            labels.append(label_batch)
    finally:
        dataset.transform = None
    if not images:
        raise ValueError("the data set has no images")
    return torch.cat(images), torch.cat(labels).long()


class TensorBatches:
    """Normalised float batches (x, y) from uint8 images, reshuffled every epoch with a seeded generator,
    with crop-and-flip augmentation when `augment`, and then, with `cutout` > 0, one `cutout` x `cutout` square
    per image (its centre anywhere in the image, clipped at the borders) set to 0 after normalisation, the
    data's mean (DeVries and Taylor, 2017). Iterating again starts the next epoch; `set_epoch` picks one (for
    resuming)."""

    def __init__(self, images: Tensor, labels: Tensor, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 *, augment: bool, shuffle: bool, seed: int = 0, padding: int = 4, cutout: int = 0):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.batch_size = batch_size
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255
        if cutout < 0:
            raise ValueError(f"cutout must be a size >= 0, got {cutout}")
        self.augment, self.shuffle, self.seed, self.padding, self.cutout = augment, shuffle, seed, padding, cutout
        self.epoch = 0

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.epoch += 1
        count = len(self.images)
        order = torch.randperm(count, generator=generator) if self.shuffle else torch.arange(count)
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size]
            images = self.images[indices]
            if self.augment:
                images = self._crop_and_flip(images, generator)
            normalised = (images.float() - self.mean) / self.std
            if self.augment and self.cutout:
                normalised = self._cut_out(normalised, generator)
            yield normalised, self.labels[indices]

    def _cut_out(self, images: Tensor, generator: torch.Generator) -> Tensor:
        count, _, height, width = images.shape
        centres = torch.stack([torch.randint(0, height, (count,), generator=generator),
                               torch.randint(0, width, (count,), generator=generator)], dim=1)
        rows, columns = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
        low, high = -(self.cutout // 2), self.cutout - self.cutout // 2
        inside = ((rows - centres[:, :1, None] >= low) & (rows - centres[:, :1, None] < high)
                  & (columns - centres[:, 1:, None] >= low) & (columns - centres[:, 1:, None] < high))
        return images.masked_fill(inside.unsqueeze(1), 0.0)

    def _crop_and_flip(self, images: Tensor, generator: torch.Generator) -> Tensor:
        count, _, height, width = images.shape
        pad = self.padding
        padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
        offsets = torch.randint(0, 2 * pad + 1, (count, 2), generator=generator).tolist()
        flips = torch.rand(count, generator=generator) < 0.5
        crops = torch.stack([padded[index, :, top:top + height, left:left + width]
                             for index, (top, left) in enumerate(offsets)])
        crops[flips] = crops[flips].flip(-1)
        return crops
