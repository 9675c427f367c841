from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image
from torchvision.datasets import ImageFolder

from ann2snn.io.data import (
    ListFileDataset,
    MNIST5k,
    cifar10_transform,
    make_loader,
    mnist5k,
    open_dataset,
    shared_dir,
    stratified_subset,
)


@pytest.fixture
def tiny_image_tree(tmp_path: Path) -> Path:
    """`<tmp>/data/test/<class>/<n>.png` plus `<tmp>/data/subsets/list.txt`, like the shared CIFAR-10 layout."""
    data = tmp_path / "data"
    # Created out of alphabetical order: labels must come from the sorted folder names.
    for class_name, count in (("zebra", 2), ("ant", 3), ("moth", 1)):
        folder = data / "test" / class_name
        folder.mkdir(parents=True)
        for index in range(count):
            # Grayscale files stay grayscale (issue 17: they were expanded to RGB silently).
            Image.new("L", (4, 4), color=index * 40).save(folder / f"{index}.png")
    (data / "subsets").mkdir()
    (data / "subsets" / "list.txt").write_text("test/zebra/1.png\ntest/ant/0.png\n\ntest/moth/0.png\ntest/ant/2.png\n")
    return data


def test_list_file_resolves_against_grandparent_and_labels_like_image_folder(tiny_image_tree: Path) -> None:
    dataset = ListFileDataset(tiny_image_tree / "subsets" / "list.txt")
    image_folder = ImageFolder(tiny_image_tree / "test")
    folder_labels = {Path(path): label for path, label in image_folder.samples}

    assert dataset.classes == image_folder.classes == ["ant", "moth", "zebra"]
    assert len(dataset) == 4
    assert [folder_labels[path] for path, _ in dataset.samples] == dataset.targets == [2, 0, 1, 0]

    image, label = dataset[0]
    assert image.mode == "L" and image.size == (4, 4)
    assert label == 2


def test_list_file_applies_transform_and_explicit_root(tiny_image_tree: Path, tmp_path: Path) -> None:
    list_file = tmp_path / "elsewhere.txt"
    list_file.write_text("test/moth/0.png\n")
    dataset = ListFileDataset(list_file, root=tiny_image_tree, transform=cifar10_transform([0.5], [0.25]))

    image, label = dataset[0]
    assert image.shape == (1, 4, 4) and image.dtype == torch.float32
    assert label == 1


def test_list_file_missing_image_is_named(tiny_image_tree: Path) -> None:
    list_file = tiny_image_tree / "subsets" / "broken.txt"
    list_file.write_text("test/ant/0.png\ntest/ant/99.png\n")
    with pytest.raises(FileNotFoundError, match="99.png"):
        ListFileDataset(list_file)


@pytest.mark.shared
@pytest.mark.parametrize(("list_name", "split"), [("test-1000.txt", "test"), ("train-calib-512.txt", "train")])
def test_shared_subsets_label_like_image_folder(shared: Path, list_name: str, split: str) -> None:
    cifar10 = shared / "data" / "cifar10"
    dataset = ListFileDataset(cifar10 / "subsets" / list_name)
    image_folder = ImageFolder(cifar10 / split)
    folder_labels = {Path(path): label for path, label in image_folder.samples}

    assert dataset.classes == image_folder.classes
    assert dataset.classes[0] == "airplane" and dataset.classes[9] == "truck"
    assert dataset.targets == [folder_labels[path] for path, _ in dataset.samples]


class LabelledRange(torch.utils.data.Dataset):
    """Sample i is (i, labels[i]); no `targets` attribute, so labels must be read by iterating."""

    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[int, int]:
        return index, self.labels[index]


class WithTargets(LabelledRange):
    @property
    def targets(self) -> torch.Tensor:
        return torch.tensor(self.labels)


def _subset_class_counts(subset: torch.utils.data.Subset, labels: list[int]) -> Counter[int]:
    return Counter(labels[index] for index in subset.indices)


@pytest.mark.parametrize("dataset_type", [LabelledRange, WithTargets])
def test_stratified_subset_is_proportional(dataset_type: type[LabelledRange]) -> None:
    labels = [0] * 500 + [1] * 300 + [2] * 200
    subset = stratified_subset(dataset_type(labels), 100, seed=0)

    assert len(subset) == len(set(subset.indices)) == 100
    assert _subset_class_counts(subset, labels) == {0: 50, 1: 30, 2: 20}


def test_stratified_subset_rounds_to_exactly_n() -> None:
    labels = [0] * 7 + [1] * 7 + [2] * 7 + [3] * 2
    subset = stratified_subset(WithTargets(labels), 10, seed=3)

    counts = _subset_class_counts(subset, labels)
    assert sum(counts.values()) == 10
    # Exact shares are 3.04, 3.04, 3.04 and 0.87: largest remainder gives 3, 3, 3, 1.
    assert counts == {0: 3, 1: 3, 2: 3, 3: 1}


def test_stratified_subset_is_deterministic_and_seeded() -> None:
    dataset = WithTargets([index % 10 for index in range(1000)])

    first = stratified_subset(dataset, 100, seed=7).indices
    assert stratified_subset(dataset, 100, seed=7).indices == first
    assert stratified_subset(dataset, 100, seed=8).indices != first
    # The global RNG plays no part.
    torch.manual_seed(12345)
    assert stratified_subset(dataset, 100, seed=7).indices == first


@pytest.mark.parametrize("size", [0, 1001])
def test_stratified_subset_rejects_impossible_sizes(size: int) -> None:
    with pytest.raises(ValueError, match="1000"):
        stratified_subset(WithTargets([0] * 1000), size, seed=0)


def test_mnist5k() -> None:
    dataset = mnist5k()

    assert len(dataset) == 5000
    assert sorted(set(dataset.targets)) == list(range(10))
    image, label = dataset[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert 0.0 <= dataset.images.min() and dataset.images.max() == 1.0
    assert label == dataset.targets[0]


def test_mnist5k_transform_and_loader() -> None:
    dataset = mnist5k(transform=lambda image: image * 2)

    images, labels = next(iter(make_loader(dataset, batch_size=32)))
    assert images.shape == (32, 1, 28, 28) and images.max() == 2.0
    assert labels.tolist() == dataset.targets[:32]


def test_open_dataset_local_forms(tiny_image_tree: Path) -> None:
    image_folder = open_dataset(str(tiny_image_tree / "test"))
    assert isinstance(image_folder, ImageFolder) and len(image_folder) == 6

    listed = open_dataset(str(tiny_image_tree / "subsets" / "list.txt"), transform=cifar10_transform([0.5], [0.25]))
    assert isinstance(listed, ListFileDataset) and listed[0][0].shape == (1, 4, 4)

    assert isinstance(open_dataset("mnist5k"), MNIST5k)


@pytest.mark.parametrize("prefix", ["", "cifar10:", "cifar10-train:"])
def test_open_dataset_missing_path_names_it_and_the_accepted_forms(tmp_path: Path, prefix: str) -> None:
    missing = tmp_path / "no_such_data"
    with pytest.raises(FileNotFoundError) as raised:
        open_dataset(f"{prefix}{missing}")
    message = str(raised.value)
    assert str(missing) in message
    for form in ("ImageFolder directory", ".txt", "cifar10:<dir>", "cifar10-train:<dir>", "mnist5k"):
        assert form in message


def test_open_dataset_cifar10_without_batches(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        open_dataset(f"cifar10:{tmp_path}")


def test_open_dataset_rejects_other_files(tmp_path: Path) -> None:
    stray = tmp_path / "weights.pt"
    stray.write_bytes(b"")
    with pytest.raises(ValueError, match="weights.pt"):
        open_dataset(str(stray))


def test_shared_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANN2SNN_SHARED", str(tmp_path))
    assert shared_dir() == tmp_path.resolve()

    monkeypatch.delenv("ANN2SNN_SHARED")
    repository_root = Path(__file__).resolve().parents[2]
    assert shared_dir() == (repository_root.parent / "shared").resolve()


@pytest.mark.shared
def test_open_dataset_on_shared_cifar10(shared: Path) -> None:
    cifar10 = shared / "data" / "cifar10"
    assert len(open_dataset(str(cifar10 / "test"))) == 10_000
    assert len(open_dataset(str(cifar10 / "subsets" / "test-1000.txt"))) == 1000
