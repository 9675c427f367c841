"""The shared CIFAR-10 subsets every tool measures on, so that their figures are comparable: test-1000 to evaluate
(optionally a stratified part of it) and train-calib-512 to calibrate, both under the model's own preprocessing."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ann2snn.io.data import ListFileDataset, make_loader, shared_dir, stratified_subset
from ann2snn.io.model_loading import Preprocessing

EVALUATION_BATCH = 250
CALIBRATION_BATCH = 128


def subset_file(name: str) -> Path:
    """`test-1000` or `train-calib-512`: the list file under the shared data."""
    return shared_dir() / "data" / "cifar10" / "subsets" / f"{name}.txt"


def test_batches(preprocessing: Preprocessing, eval_size: int | None = None) -> list[Any]:
    """test-1000 (a stratified `eval_size` of it, seed 0) as labelled batches."""
    test = ListFileDataset(subset_file("test-1000"), transform=preprocessing.transform())
    if eval_size:
        test = stratified_subset(test, eval_size, seed=0)
    return list(make_loader(test, EVALUATION_BATCH))


def calibration_inputs(preprocessing: Preprocessing) -> list[torch.Tensor]:
    """train-calib-512's images, in batches, without labels."""
    dataset = ListFileDataset(subset_file("train-calib-512"), transform=preprocessing.transform())
    return [x for x, _ in make_loader(dataset, CALIBRATION_BATCH)]
