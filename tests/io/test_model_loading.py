from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from ann2snn.io.checkpoint import CheckpointError
from ann2snn.io.model_loading import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    Preprocessing,
    infer_arch,
    load_model,
    save_checkpoint,
)
from ann2snn.zoo import build_model


def assert_same_weights(model: nn.Module, reference: nn.Module) -> None:
    for (name, tensor), expected in zip(model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(tensor, expected, msg=name)


def test_self_describing_checkpoint_needs_no_flags(tmp_path: Path) -> None:
    reference = build_model("resnet20", num_classes=7)
    preprocessing = Preprocessing(mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], image_size=[3, 32, 32])
    path = save_checkpoint(reference, tmp_path / "anything.pt", "resnet20", {"num_classes": 7}, preprocessing)

    loaded = load_model(path)
    assert (loaded.arch, loaded.arch_kwargs, loaded.arch_source) == ("resnet20", {"num_classes": 7}, "checkpoint")
    assert loaded.preprocessing == preprocessing
    assert not loaded.model.training
    assert_same_weights(loaded.model, reference)


def test_checkpoints_carry_their_format_version(tmp_path: Path) -> None:
    """Written with version 1; one without a version (written before checkpoints had one, like the shipped
    models/*.pt) reads as version 1; another version is refused by number."""
    reference = build_model("resnet20")
    path = save_checkpoint(reference, tmp_path / "net.pt", "resnet20", quantization={"qbits": 4})
    document = torch.load(path, weights_only=True)
    assert (document["format"], document["version"]) == (CHECKPOINT_FORMAT, CHECKPOINT_VERSION) == (
        "ann2snn-checkpoint", 1)
    del document["version"]
    torch.save(document, path)
    loaded = load_model(path)
    assert (loaded.arch, loaded.arch_source, loaded.quantization) == ("resnet20", "checkpoint", {"qbits": 4})
    assert_same_weights(loaded.model, reference)
    torch.save({**document, "version": 2}, path)
    with pytest.raises(CheckpointError, match=r"net.pt: an ann2snn-checkpoint file of format version 2; this ann2snn "
                                              r"reads version 1"):
        load_model(path)


def test_shipped_checkpoints_without_a_version_load() -> None:
    shipped = Path(__file__).parents[2] / "models" / "resnet20-q4.pt"
    assert "version" not in torch.load(shipped, weights_only=True)
    loaded = load_model(shipped)
    assert loaded.arch == "resnet20" and set(loaded.quantization) >= {"qbits", "thresholds"}


def test_flags_override_the_checkpoint_preprocessing(tmp_path: Path) -> None:
    path = save_checkpoint(build_model("resnet20"), tmp_path / "net.pt", "resnet20")
    loaded = load_model(path, preprocessing={"image_size": [3, 40, 40]})
    assert loaded.preprocessing.image_size == [3, 40, 40]
    assert loaded.preprocessing.mean == Preprocessing().mean


def test_plain_state_dict_with_arch_and_inferred_num_classes(tmp_path: Path) -> None:
    reference = build_model("resnet20", num_classes=100)
    path = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), path)

    loaded = load_model(path, arch="resnet20")
    assert loaded.arch_kwargs == {"num_classes": 100} and loaded.arch_source == "argument"
    assert loaded.preprocessing == Preprocessing()
    assert_same_weights(loaded.model, reference)


def test_wrapped_data_parallel_checkpoint_with_arch_from_the_file_name(tmp_path: Path) -> None:
    reference = build_model("resnet20")
    path = tmp_path / "resnet20-cifar10.th"
    torch.save({"best_prec1": 91.7, "state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}, path)

    loaded = load_model(path)
    assert (loaded.arch, loaded.arch_source) == ("resnet20", "file name")
    assert_same_weights(loaded.model, reference)


def test_file_name_inference_takes_the_one_fitting_name(tmp_path: Path) -> None:
    vgg = build_model("vgg11_bn_cifar").state_dict()
    assert infer_arch(tmp_path / "vgg11_bn_cifar-run3.pt", vgg) == "vgg11_bn_cifar"
    # a variant of the name the file starts with: chenyaofo's option-B ResNet-56 is not the option-A resnet56
    option_b = build_model("resnet56_b").state_dict()
    assert infer_arch(tmp_path / "resnet56-cifar10-chenyaofo.pt", option_b) == "resnet56_b"
    # Names the registry lacks come from torchvision.
    small = build_model("torchvision:mobilenet_v3_small", num_classes=10).state_dict()
    assert infer_arch(tmp_path / "mobilenet_v3_small.pt", small) == "torchvision:mobilenet_v3_small"


@pytest.mark.parametrize("stem, arch, fitting", [
    ("mobilenet_v2", "torchvision:mobilenet_v2",
     "mobilenet_v2_cifar, mobilenet_v2_cifar_s2, torchvision:mobilenet_v2"),
    # underscores left out of the file name, as chenyaofo's release names them
    ("shufflenetv2_x0_5-cifar10-chenyaofo", "shufflenet_v2_x0_5_cifar",
     "shufflenet_v2_x0_5_cifar, torchvision:shufflenet_v2_x0_5"),
])
def test_several_fitting_names_are_an_error(tmp_path: Path, stem: str, arch: str, fitting: str) -> None:
    """The same layers with other strides compute something else: a torchvision mobilenet_v2 saved as
    mobilenet_v2.pt was silently built as mobilenet_v2_cifar, whose outputs differ completely."""
    state = build_model(arch, num_classes=10).state_dict()
    with pytest.raises(CheckpointError, match=rf"fit several architectures .*\({fitting}\).*pass --arch"):
        infer_arch(tmp_path / f"{stem}.pt", state)


def test_a_zoo_architecture_brings_the_preprocessing_it_was_trained_with(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(build_model("resnet20_b").state_dict(), path)
    assert load_model(path, arch="resnet20_b").preprocessing.mean == [0.4914, 0.4822, 0.4465]
    assert load_model(path, arch="resnet20_b", preprocessing={"mean": [0.5] * 3}).preprocessing.mean == [0.5] * 3
    torch.save(build_model("resnet20").state_dict(), path)
    assert load_model(path, arch="resnet20").preprocessing.mean == [0.485, 0.456, 0.406]


def test_torchvision_arch_by_name(tmp_path: Path) -> None:
    reference = build_model("torchvision:mobilenet_v3_small", num_classes=10)
    path = tmp_path / "weights.pt"
    torch.save(reference.state_dict(), path)
    loaded = load_model(path, arch="torchvision:mobilenet_v3_small")
    assert loaded.arch_kwargs == {"num_classes": 10}
    assert_same_weights(loaded.model, reference)


def test_unknown_file_name_says_what_to_pass(tmp_path: Path) -> None:
    path = tmp_path / "my_model.pt"
    torch.save(build_model("resnet20").state_dict(), path)
    with pytest.raises(CheckpointError,
                       match=r"cannot tell the architecture .* pass --arch NAME .*resnet20.*torchvision:"):
        load_model(path)


def test_file_name_that_does_not_fit_the_weights(tmp_path: Path) -> None:
    path = tmp_path / "resnet32-cifar10.pt"
    torch.save(build_model("resnet20").state_dict(), path)
    with pytest.raises(CheckpointError,
                       match=r"fit none of the architectures its file name suggests \(resnet32, resnet32_b\)"):
        load_model(path)


def test_unknown_arch(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(build_model("resnet20").state_dict(), path)
    with pytest.raises(ValueError, match="unknown model 'resnet21'; known models: .*resnet20"):
        load_model(path, arch="resnet21")
    with pytest.raises(ValueError, match="unknown torchvision model 'nonet'"):
        load_model(path, arch="torchvision:nonet")


def test_arch_that_does_not_fit(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(build_model("resnet20").state_dict(), path)
    with pytest.raises(CheckpointError, match="does not fit CifarResNet: .*missing keys"):
        load_model(path, arch="resnet32")


def test_pickled_module_needs_trust(tmp_path: Path) -> None:
    reference = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    path = tmp_path / "whole.pt"
    torch.save(reference, path)
    with pytest.raises(CheckpointError, match="--trust-pickle"):
        load_model(path)

    loaded = load_model(path, trust_pickle=True, preprocessing={"mean": [0.0], "std": [1.0], "image_size": [1, 3, 4]})
    assert (loaded.arch, loaded.arch_source) == ("Sequential", "pickled module")
    assert_same_weights(loaded.model, reference)


def test_preprocessing_validation_and_transform() -> None:
    with pytest.raises(ValueError, match="one value per channel"):
        Preprocessing(mean=[0.5], std=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match="three positive integers"):
        Preprocessing(image_size=[32, 32])

    image = Image.new("RGB", (40, 30), color=(255, 0, 255))
    # images of another size are refused, unless resize is asked for (issue 17: they were resized silently)
    with pytest.raises(ValueError, match=r"the data has 3x30x40 images but the model expects 3x16x16 inputs"):
        Preprocessing(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], image_size=[3, 16, 16]).transform()(image)
    transform = Preprocessing(mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5], image_size=[3, 16, 16],
                              resize=True).transform()
    tensor = transform(image)
    assert tensor.shape == (3, 16, 16)
    torch.testing.assert_close(tensor[:, 0, 0], torch.tensor([1.0, -1.0, 1.0]))
    # Tensors in [0, 1] (mnist5k) are taken as they are.
    identity = Preprocessing(mean=[0.0], std=[1.0], image_size=[1, 28, 28]).transform()
    assert identity(torch.ones(1, 28, 28)).shape == (1, 28, 28)


def test_wrong_channel_count_names_both_sizes() -> None:
    transform = Preprocessing().transform()
    with pytest.raises(ValueError, match=r"wrong input size: the data has 1-channel images \(1x28x28\) but the "
                                         r"model expects 3x32x32"):
        transform(torch.zeros(1, 28, 28))
