"""Data-parallel calibration and evaluation: shards, exact merging across processes, failing processes.

Several processes with the gloo backend must reproduce one process's thresholds and report exactly,
through the Python API (processes started here) and through `torchrun ... -m ann2snn convert`."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ann2snn
from ann2snn import distributed
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.distributed import process_group, reduce_over_processes, require_on_every_process, shard
from ann2snn.io.model_loading import Preprocessing, save_checkpoint
from ann2snn.zoo import build_model
from tests.helpers import randomize_bn
from tests.networks import ResidualNet

CALIBRATIONS = [(rule, per_channel) for rule in ("max", "percentile", "mse") for per_channel in (False, True)]
BATCH = 5
PROCESSES = 2


# ---------------------------------------------------------------------------------------------------
# Shards


@pytest.mark.parametrize("images, batch_size, processes", [(1000, 96, 2), (37, 5, 3), (10, 5, 2), (11, 5, 3)])
def test_shards_are_whole_batches_disjoint_complete_and_unpadded(monkeypatch, images: int, batch_size: int,
                                                                 processes: int) -> None:
    dataset = list(range(images))
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: processes)
    shards = []
    for process in range(processes):
        monkeypatch.setattr(distributed, "rank", lambda process=process: process)
        shards.append([dataset_index for dataset_index in shard(dataset, batch_size)])
    single_batches = [dataset[start:start + batch_size] for start in range(0, images, batch_size)]
    for process, indices in enumerate(shards):
        # read in batches of batch_size, a shard gives exactly batches process, process + W, ... of one process
        assert [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)] == \
            single_batches[process::processes]
    assert sorted(index for indices in shards for index in indices) == dataset
    sizes = [len(indices) for indices in shards]
    assert max(sizes) - min(sizes) <= batch_size


def test_too_few_batches_for_the_processes_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    monkeypatch.setattr(distributed, "rank", lambda: 2)
    with pytest.raises(ValueError, match="10 images make 2 batch"):
        shard(list(range(10)), 5)


def test_a_single_process_is_left_alone() -> None:
    dataset = list(range(7))
    assert shard(dataset, 2) is dataset
    assert reduce_over_processes({"a": 1, "b": [torch.ones(2)]}, "sum")["a"] == 1
    with pytest.raises(ValueError, match="nothing here"):
        require_on_every_process(False, "nothing here")


# ---------------------------------------------------------------------------------------------------
# The Python API in several processes


def model_and_data() -> tuple[nn.Module, TensorDataset]:
    """33 labelled images (7 batches of 5, the last short: shards of 4 and 3 batches) whose scale grows
    by batch, so that the processes' activation maxima, and so their histogram ranges, differ."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = randomize_bn(ResidualNet()).eval()
    images = torch.randn(33, 3, 8, 8, generator=generator)
    images *= (1.6 ** (torch.arange(33) // BATCH)).view(-1, 1, 1, 1)
    return model, TensorDataset(images, torch.randint(0, 5, (33,), generator=generator))


# what differs between two runs of one measurement: how long it took, and when and by which command it ran
RUN_RECORDS = ("timing", "provenance")


def measure(model: nn.Module, dataset: TensorDataset) -> dict:
    """Thresholds by every rule, and the report of one converted network, on this process's shard."""
    loader = DataLoader(shard(dataset, BATCH), batch_size=BATCH)
    thresholds = {}
    for rule, per_channel in CALIBRATIONS:
        qann = ann2snn.quantize(model, loader, 2, threshold_rule=rule, per_channel=per_channel, percentile=99.0)
        thresholds[rule, per_channel] = {name: module.theta for name, module in qann.named_modules()
                                         if isinstance(module, QCFSQuantizer)}
    snn = ann2snn.convert(model, loader, qbits=2, T=4, neuron="if", threshold_rule="mse")
    report = ann2snn.evaluate(snn, loader, [1, 2, 4], ann=model).to_json()
    return {"thresholds": thresholds, "report": {key: value for key, value in report.items() if key not in RUN_RECORDS},
            "processes": report["timing"]["processes"]}


@contextmanager
def one_thread():
    # The processes compute with one thread each; so does the reference, for identical float rounding.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _errors_of(call) -> str | None:
    try:
        call()
    except ValueError as error:
        return str(error)
    return None


def _api_process(process: int, processes: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=rendezvous, rank=process, world_size=processes,
                            timeout=timedelta(seconds=60))
    model, dataset = model_and_data()
    results = measure(model, dataset)
    # Failures that only some processes see are raised by all of them, none left waiting.
    results["empty_shard_error"] = _errors_of(lambda: ann2snn.evaluate(
        ann2snn.convert(model, DataLoader(dataset, batch_size=BATCH), qbits=2, T=2),
        [] if process == 1 else DataLoader(dataset, batch_size=BATCH)))
    results["mismatch_error"] = _errors_of(lambda: reduce_over_processes({"x": torch.ones(2 + (process == 1))}, "sum"))
    torch.save(results, Path(out) / f"{process}.pt")
    dist.destroy_process_group()


def test_api_in_several_processes_gives_exactly_the_single_process_results(tmp_path: Path) -> None:
    mp.spawn(_api_process, args=(PROCESSES, f"file://{tmp_path / 'rendezvous'}", str(tmp_path)), nprocs=PROCESSES)
    with one_thread():
        reference = measure(*model_and_data())
    assert reference["processes"] == 1
    for process in range(PROCESSES):
        results = torch.load(tmp_path / f"{process}.pt", weights_only=False)
        assert results["processes"] == PROCESSES
        assert results["thresholds"].keys() == reference["thresholds"].keys()
        for calibration, thresholds in reference["thresholds"].items():
            assert len(thresholds) == 2
            for name, theta in thresholds.items():
                torch.testing.assert_close(results["thresholds"][calibration][name], theta, rtol=0, atol=0,
                                           msg=f"{calibration} {name}")
        assert results["report"] == reference["report"]
        assert results["empty_shard_error"] == "the evaluation loader yielded no batches (on process 1 of 2)"
        assert "processes 0 and 1 do not measure the same things" in results["mismatch_error"]
    report = reference["report"]
    assert report["images"] == 33 and 0 < report["spikes"]["per_image"]["4"]


def _hanging_peer_process(process: int, port: int, out: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(process), LOCAL_RANK=str(process), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    done = Path(out) / "done"
    with process_group(torch.device("cpu"), timedelta(seconds=2)):
        if process == 1:  # stuck: never reaches the collective
            deadline = time.monotonic() + 60
            while not done.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            return
        start = time.monotonic()
        try:
            require_on_every_process(True, "unused")
        except RuntimeError as error:
            (Path(out) / "waited").write_text(f"{time.monotonic() - start} {type(error).__name__}: {error}")
        done.touch()


def test_a_stuck_process_makes_the_others_fail_after_the_timeout(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_hanging_peer_process, args=(port, str(tmp_path)), nprocs=2)
    waited, message = (tmp_path / "waited").read_text().split(" ", 1)
    assert 1.5 < float(waited) < 30, message


# ---------------------------------------------------------------------------------------------------
# torchrun and the command line


def torchrun(processes: int, *arguments: str | Path, timeout: float) -> subprocess.CompletedProcess:
    # --standalone: a private rendezvous on a free port, so that concurrent runs cannot collide.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "ann2snn", *map(str, arguments)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def single_process(*arguments: str | Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ann2snn", *map(str, arguments)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})


def thresholds_of(directory: Path) -> dict[str, torch.Tensor]:
    qann = ann2snn.load(directory / "snn.pt").qann
    return {name: module.theta for name, module in qann.named_modules() if isinstance(module, QCFSQuantizer)}


@pytest.mark.shared
@pytest.mark.slow
def test_torchrun_two_processes_reproduce_the_single_process_conversion_on_test_1000(shared: Path,
                                                                                    tmp_path: Path) -> None:
    # Batches of 96: calibration 512 = 5 x 96 + 32, evaluation 1000 = 10 x 96 + 40, so the two shards
    # are uneven (3 and 3 batches, 6 and 5) and one ends with the short batch. T = 2 keeps it fast.
    arguments = [shared / "models" / "resnet20-cifar10.th", "--eval", shared / "data/cifar10/subsets/test-1000.txt",
                 "--T", "2", "--T-list", "1,2", "--batch-size", "96", "--neuron", "signed-rate", "--per-channel",
                 "--threshold-rule", "percentile", "--no-progress"]
    single = single_process("convert", *arguments, "--out", tmp_path / "one", timeout=300)
    assert single.returncode == 0, single.stderr
    parallel = torchrun(2, "convert", *arguments, "--out", tmp_path / "two", timeout=300)
    assert parallel.returncode == 0, parallel.stderr
    # rank 0 alone prints the summary
    assert parallel.stdout.count("Wrote ") == 1

    one, two = (json.loads((tmp_path / run / "report.json").read_text()) for run in ("one", "two"))
    assert one["images"] == two["images"] == 1000
    assert one["data"]["calibration"]["images"] == 512
    assert (one["timing"]["processes"], two["timing"]["processes"]) == (1, 2)
    assert {key: value for key, value in one.items() if key not in RUN_RECORDS} == \
        {key: value for key, value in two.items() if key not in RUN_RECORDS}
    assert one["accuracy"]["snn"]["2"] > 0.15 and one["spikes"]["per_layer"][0]["spikes_per_image"] > 0
    reference, parallel_thresholds = thresholds_of(tmp_path / "one"), thresholds_of(tmp_path / "two")
    assert len(reference) == 19 and reference.keys() == parallel_thresholds.keys()
    for name, theta in reference.items():
        torch.testing.assert_close(parallel_thresholds[name], theta, rtol=0, atol=0, msg=name)


def test_a_failing_process_ends_the_torchrun_job_with_its_error(tmp_path: Path) -> None:
    data = tmp_path / "data"
    generator = np.random.default_rng(0)
    for label in ("cat", "dog", "frog"):
        (data / label).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(generator.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / label / f"{index}.png")
    # Batches of 2 in ImageFolder order: [cat], [dog], [frog]; process 1 gets dog's, which is unreadable.
    (data / "dog" / "1.png").write_bytes(b"not an image")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(build_model("resnet20"), tmp_path / "resnet20.pt", "resnet20",
                                 preprocessing=Preprocessing())

    start = time.monotonic()
    # The collective timeout is far above the bound: torchrun itself must stop the waiting process.
    job = torchrun(2, "convert", checkpoint, "--calib", data, "--eval", data, "--out", tmp_path / "out", "--T", "2",
                   "--batch-size", "2", "--no-progress", "--dist-timeout", "600", timeout=240)
    elapsed = time.monotonic() - start
    assert job.returncode != 0
    # The failing process names itself and the cause (process 0 may report losing its peer as well).
    errors = [line for line in job.stderr.splitlines() if line.startswith("ann2snn: error: process 1 of 2:")]
    assert len(errors) == 1 and "1.png" in errors[0], job.stderr
    assert not (tmp_path / "out").exists()
    assert elapsed < 120, elapsed
