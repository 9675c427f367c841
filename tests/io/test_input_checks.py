"""Inputs checked before any work (issue 17): class folders against the model's outputs, hidden folders, image
files decoded and matched to the model's input size, duplicate list lines, and checkpoints whose diagnosis used
to name the wrong cause. Each test reproduces a report of the issue."""
from __future__ import annotations

import sys
import time
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from ann2snn.errors import ConversionWarning, InputError
from ann2snn.io.checkpoint import CheckpointError, load_state_dict, read_checkpoint
from ann2snn.io.data import CIFAR10_CLASSES, check_classes, check_image_files, open_dataset
from ann2snn.io.model_loading import Preprocessing, load_model
from ann2snn.workflow import check_model_input, open_data
from ann2snn.zoo import build_model

COLOUR_8 = Preprocessing(mean=[0.5] * 3, std=[0.25] * 3, image_size=[3, 8, 8])


def image_folder(root: Path, classes=CIFAR10_CLASSES, images: int = 2, size=(8, 8), mode: str = "RGB") -> Path:
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(images):
            Image.new(mode, size, color=index * 50).save(root / name / f"{index}.png")
    return root


def ten_outputs() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10)).eval()


# Class folders ------------------------------------------------------------------------------------------------


def test_a_missing_class_folder_is_named_not_shifting_the_labels(tmp_path: Path) -> None:
    """Without cat/, every label from dog on was one too low: ANN 33 % instead of 86 %."""
    no_cat = image_folder(tmp_path / "no_cat", [name for name in CIFAR10_CLASSES if name != "cat"])
    dataset, entry = open_data(str(no_cat), COLOUR_8)
    assert entry["classes"] == [name for name in CIFAR10_CLASSES if name != "cat"]
    with pytest.raises(InputError, match=r"^evaluation data .*no_cat: class folder cat missing \(the model's 10 "
                                         r"outputs stand for the CIFAR-10 classes\); labels number the sorted class"):
        check_model_input(ten_outputs(), dataset, "cpu", labelled=True, where=f"evaluation data {no_cat}")
    # against the calibration data's classes, whatever their names
    with pytest.raises(InputError, match=r"^x: class folder c missing \(the model's 3 outputs stand for the "
                                         r"calibration data's classes\)"):
        check_classes("x", ["a", "b"], 3, ["a", "b", "c"])
    # with no reference to tell which class is missing, too few classes are refused all the same
    with pytest.raises(InputError, match=r"^x: 2 classes \(a, b\) but the model has 3 outputs"):
        check_classes("x", ["a", "b"], 3)
    # calibration data needs no labels: a missing class only warns
    with pytest.warns(ConversionWarning, match="class folder cat missing .* calibrated without such images"):
        check_model_input(ten_outputs(), dataset, "cpu", where="the calibration data")
    complete = image_folder(tmp_path / "complete")
    check_model_input(ten_outputs(), open_data(str(complete), COLOUR_8)[0], "cpu", labelled=True)


def test_hidden_folders_and_files_are_not_classes_or_images(tmp_path: Path) -> None:
    """.ipynb_checkpoints/ holding an image was an 11th class: 'labels out of range: 10'."""
    data = image_folder(tmp_path / "data")
    image_folder(data / ".ipynb_checkpoints", ["cat"], images=1)
    Image.new("RGB", (8, 8)).save(data / ".ipynb_checkpoints" / "0.png")
    Image.new("RGB", (8, 8)).save(data / "cat" / "._0.png")  # macOS resource fork
    image_folder(data / "dog" / ".thumbnails", ["small"], images=1)
    dataset = open_dataset(str(data))
    assert dataset.classes == list(CIFAR10_CLASSES) and len(dataset) == 20
    check_model_input(ten_outputs(), open_data(str(data), COLOUR_8)[0], "cpu", labelled=True)


# Image files --------------------------------------------------------------------------------------------------


def test_images_of_another_size_or_channels_are_refused_naming_the_files(tmp_path: Path) -> None:
    """They were resized silently (non-square ones stretched), grayscale ones expanded to three channels."""
    data = image_folder(tmp_path / "data", ["a", "b"])
    Image.new("RGB", (10, 10)).save(data / "a" / "big.png")
    Image.new("RGB", (12, 8)).save(data / "b" / "wide.png")
    Image.new("L", (8, 8)).save(data / "b" / "gray.png")
    with pytest.raises(InputError, match=r"data: 3 of 7 images do not fit the model's 3x8x8 inputs \(8x8 pixels, "
                                         r"colour\): .*a/big.png \(10x10 pixels\), .*b/gray.png \(grayscale\), "
                                         r".*b/wide.png \(12x8 pixels\); resize or convert them, or pass --resize"):
        open_data(str(data), COLOUR_8)
    # with resize: a warning naming them, and every image of the model's size and channels
    with pytest.warns(ConversionWarning, match=r"3 of 7 images do not fit .* are resized \(non-square ones "
                                               r"stretched\) and converted as they are read \(--resize\)"):
        dataset, _ = open_data(str(data), Preprocessing(**{**COLOUR_8.to_dict(), "resize": True}))
    assert {dataset[index][0].shape for index in range(len(dataset))} == {(3, 8, 8)}


def test_grayscale_images_stay_grayscale_for_a_grayscale_model(tmp_path: Path) -> None:
    data = image_folder(tmp_path / "data", ["a", "b"], mode="L")
    dataset, _ = open_data(str(data), Preprocessing(mean=[0.5], std=[0.25], image_size=[1, 8, 8]))
    assert dataset[0][0].shape == (1, 8, 8)
    with pytest.raises(InputError, match=r"4 of 4 images do not fit the model's 3x8x8 .* \(grayscale\)"):
        open_data(str(data), COLOUR_8)


def test_data_sets_without_files_are_checked_on_their_first_sample() -> None:
    with pytest.raises(ValueError, match=r"the data has 1x28x28 images but the model expects 1x4x4 inputs; resize "
                                         r"the data, pass --resize"):
        open_data("mnist5k", Preprocessing(mean=[0.1], std=[0.3], image_size=[1, 4, 4]))[0][0]


def truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def test_corrupt_images_are_named_before_any_work(tmp_path: Path) -> None:
    """A truncated image failed its batch minutes in, as 'Truncated File Read', naming no file."""
    data = image_folder(tmp_path / "data", ["a", "b"], size=(8, 8))
    Image.new("RGB", (8, 8), color=(10, 200, 30)).save(data / "b" / "photo.jpg", quality=95)
    truncate(data / "b" / "photo.jpg", 300)
    truncate(data / "a" / "1.png", 40)
    (data / "a" / "notes.png").write_text("not an image")
    with pytest.raises(InputError, match=r"data: 3 of 6 image files cannot be read: .*a/1.png \(.+\), .*a/notes.png "
                                         r"\(cannot identify image file .*\), .*b/photo.jpg \(.+\); replace or remove"):
        open_data(str(data), COLOUR_8)


@pytest.mark.shared
def test_decoding_the_shared_test_set_takes_seconds(shared: Path) -> None:
    """Every image of the 10,000-image test set is decoded before the work starts; that must stay cheap."""
    dataset = open_dataset(str(shared / "data" / "cifar10" / "test"))
    start = time.perf_counter()
    assert check_image_files(dataset, [3, 32, 32]) == 0
    assert time.perf_counter() - start < 60


# Lists and sizes ----------------------------------------------------------------------------------------------


def test_duplicate_list_lines_are_refused_with_their_numbers(tmp_path: Path) -> None:
    """A repeated line counted its image twice in every accuracy, silently."""
    image_folder(tmp_path / "test", ["a", "b"])
    (tmp_path / "subsets").mkdir()
    listing = tmp_path / "subsets" / "list.txt"
    listing.write_text("test/a/0.png\ntest/b/1.png\n\ntest/a/1.png\n./test/a/0.png\ntest/b/1.png\n")
    with pytest.raises(ValueError, match=r"list.txt: 2 duplicate lines, which would count images twice: line 5 "
                                         r"repeats line 1 \(./test/a/0.png\), line 6 repeats line 2 \(test/b/1.png\); "
                                         r"list each image once$"):
        open_dataset(str(listing))


def test_a_size_larger_than_the_data_warns(tmp_path: Path) -> None:
    """--eval-size 500 on 100 images used the 100 without a word."""
    data = image_folder(tmp_path / "data", ["a", "b"])
    with pytest.warns(ConversionWarning, match=r"data holds 4 images, fewer than the 500 asked for: all 4 are used"):
        _, entry = open_data(str(data), COLOUR_8, 500)
    assert (entry["images"], entry["available"]) == (4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_data(str(data), COLOUR_8, 4)


# Checkpoints --------------------------------------------------------------------------------------------------


def resnet20_state() -> dict[str, torch.Tensor]:
    return build_model("resnet20").state_dict()


@pytest.mark.parametrize("change, fragments", [
    (lambda state: {**state, "fc_extra.weight": torch.zeros(3)}, ["1 unexpected keys: fc_extra.weight"]),
    (lambda state: {key: value for key, value in state.items() if key != "bn1.bias"}, ["1 missing keys: bn1.bias"]),
], ids=["extra-key", "missing-key"])
def test_an_inferred_architecture_that_does_not_fit_says_what_is_wrong(tmp_path: Path, change, fragments) -> None:
    """They said only 'fit none of the architectures its file name suggests; pass --arch'."""
    path = tmp_path / "resnet20.pt"
    torch.save(change(resnet20_state()), path)
    with pytest.raises(CheckpointError) as raised:
        load_model(path)
    assert "the closest, resnet20, does not fit them: " in str(raised.value)
    for fragment in fragments:
        assert fragment in str(raised.value)


def test_a_num_classes_mismatch_names_the_shapes(tmp_path: Path) -> None:
    path = tmp_path / "resnet20.pt"
    torch.save(resnet20_state(), path)
    with pytest.raises(CheckpointError, match=r"the closest, resnet20 with --num-classes 100, does not fit them: 2 "
                                              r"shape mismatches: linear.weight \(checkpoint \(10, 64\), model "
                                              r"\(100, 64\)\)"):
        load_model(path, num_classes=100)


@pytest.mark.parametrize("prefix", ["_orig_mod.", "module._orig_mod.", "_orig_mod.module."])
def test_torch_compile_prefixes_are_stripped(tmp_path: Path, prefix: str) -> None:
    state = resnet20_state()
    path = tmp_path / "resnet20.pt"
    torch.save({prefix + key: value for key, value in state.items()}, path)
    assert list(load_state_dict(path)) == list(state)
    assert load_model(path).arch == "resnet20"


def test_a_pickled_class_that_cannot_be_imported_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It was called 'not a torch checkpoint'; --trust-pickle needs the class importable (PYTHONPATH)."""
    package = tmp_path / "code"
    package.mkdir()
    (package / "mynet_issue17.py").write_text("import torch.nn as nn\n\nclass MyNet(nn.Sequential):\n    pass\n")
    monkeypatch.syspath_prepend(str(package))
    import mynet_issue17

    path = tmp_path / "mynet.pt"
    torch.save(mynet_issue17.MyNet(nn.Linear(2, 2)), path)
    monkeypatch.delitem(sys.modules, "mynet_issue17")
    monkeypatch.setattr(sys, "path", [entry for entry in sys.path if entry != str(package)])
    with pytest.raises(CheckpointError, match=r"mynet.pt: a pickled object whose class cannot be imported "
                                              r"\(ModuleNotFoundError: No module named 'mynet_issue17'\); .* must be "
                                              r"importable: add its directory to PYTHONPATH"):
        read_checkpoint(path, trust_pickle=True)
    monkeypatch.syspath_prepend(str(package))
    assert type(read_checkpoint(path, trust_pickle=True)).__name__ == "MyNet"


@pytest.mark.parametrize("trust_pickle", [False, True])
def test_torchscript_is_named(tmp_path: Path, trust_pickle: bool) -> None:
    """It was 'not a torch checkpoint' without trust, 'data-dependent control flow' with it."""
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated
        torch.jit.script(ten_outputs()).save(path)
    with pytest.raises(CheckpointError, match=r"scripted.pt: a TorchScript archive \(torch.jit.save\), not a "
                                              r"checkpoint: .*\(torch.save\(model.state_dict\(\), path\)\)"):
        read_checkpoint(path, trust_pickle=trust_pickle)


def test_onnx_and_zip_files_are_named(tmp_path: Path) -> None:
    """They gave pickle internals ('Unsupported operand 8', '[enforce fail at inline_container.cc]')."""
    onnx_file = tmp_path / "model.onnx"
    torch.onnx.export(ten_outputs(), (torch.zeros(1, 3, 8, 8),), str(onnx_file), dynamo=False)
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(onnx_file.read_bytes())
    for path in (onnx_file, renamed):
        with pytest.raises(CheckpointError, match=r"model.(onnx|bin): an ONNX model, not a torch checkpoint"):
            read_checkpoint(path)
    archive = tmp_path / "weights.zip"
    with zipfile.ZipFile(archive, "w") as writing:
        writing.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match=r"weights.zip: a zip archive holding readme.txt, not a torch checkpoint"):
        read_checkpoint(archive)
