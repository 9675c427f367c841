"""The library workflow under the CLI: `convert_checkpoint` does what `ann2snn convert` does, with the
checkpoint's policy (fine-tuned thresholds, pruning, bits under a budget) reachable from Python."""
from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

import ann2snn
from ann2snn.compiler.quantizer import QCFSQuantizer
from ann2snn.config import ConversionConfig
from ann2snn.io.data import make_loader
from ann2snn.io.model_loading import load_model
from ann2snn.io.output_directory import MARKER
from ann2snn.training.finetune import quantization_aware
from ann2snn.workflow import (
    Execution,
    Pruning,
    checkpoint_config,
    convert_checkpoint,
    evaluate_saved,
    open_data,
    write_conversion,
)
from tests.helpers import digits_args, digits_checkpoint, run_cli

PREPROCESSING = {"mean": [0.13], "std": [0.31], "image_size": [1, 28, 28]}
DATA = {"calib": "mnist5k", "calib_size": 40}
FAST = Execution(seed=3, progress=False)
TIMINGS = ("timing", "provenance")  # what differs between two runs of one measurement: when and how long


def without_timings(document: dict) -> dict:
    return {key: value for key, value in document.items() if key not in TIMINGS}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory):
    checkpoint = digits_checkpoint(tmp_path_factory.mktemp("checkpoint"))
    return checkpoint, load_model(checkpoint, preprocessing=PREPROCESSING, trust_pickle=True)


def fine_tuned(loaded, qbits: int = 3):
    """The loaded model as if fine-tuned at `qbits`: thresholds half of what calibration finds, so that
    they tell themselves apart from a calibration."""
    calibration, _ = open_data("mnist5k", loaded.preprocessing, 40, 3)
    graph = quantization_aware(loaded.model, itertools.islice(make_loader(calibration, 20), 2), qbits)
    thresholds = {name: 0.5 * q.theta.detach() for name, q in graph.named_modules() if isinstance(q, QCFSQuantizer)}
    return dataclasses.replace(loaded, quantization={"qbits": qbits, "thresholds": thresholds}), thresholds


def qann_thresholds(snn) -> dict[str, torch.Tensor]:
    return {name: q.theta for name, q in snn.qann.named_modules() if isinstance(q, QCFSQuantizer)}


def test_convert_checkpoint_is_what_the_command_line_writes(capsys, digits, tmp_path):
    checkpoint, loaded = digits
    out = tmp_path / "cli"
    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--out", out, "--seed", "3"))
    assert code == 0, err
    conversion = convert_checkpoint(loaded, source=checkpoint, eval="mnist5k", eval_size=20, T_list=[4], T=4,
                                    execution=FAST, **DATA)
    written = json.loads((out / "report.json").read_text())
    assert without_timings(json.loads(json.dumps(conversion.report))) == without_timings(written)
    assert ConversionConfig.from_dict({key: value for key, value in written["config"].items()
                                       if key not in ("coding", "T_list")}) == ConversionConfig.from_dict(
        {"T": 4, "per_channel": True, "readout_delay": 0.5, "snn_calibration": "weights"})  # what the defaults decided

    files = write_conversion(tmp_path / "library", conversion)
    assert {*files, MARKER} == {path.name for path in out.iterdir()}
    again = evaluate_saved(tmp_path / "library", "mnist5k", eval_size=20, T_list=[4], execution=FAST)
    assert again["accuracy"] == written["accuracy"]


def test_fine_tuned_thresholds_at_their_own_bits(digits):
    _, loaded = digits
    tuned, thresholds = fine_tuned(loaded)
    # 3 bits: 7 levels, which 0/1 neurons resolve in T = 7 steps; signed neurons take them at any T
    for settings in ({"T": 7}, {"T": 4, "neuron": "signed"}, {"T": 4, "threshold_levels": "bits"}):
        snn = convert_checkpoint(tuned, execution=FAST, **DATA, **settings).snn
        assert snn.config["qbits"] == 3 and snn.config["threshold_rule"] == "fine-tuned"
        for name, theta in qann_thresholds(snn).items():
            torch.testing.assert_close(theta.flatten(), thresholds[name].flatten())

    notes: list[str] = []
    for settings in ({"qbits": 4}, {"recalibrate": True}, {"T": 4}):
        snn = convert_checkpoint(tuned, execution=FAST, log=notes.append, **DATA, **{"T": 7, **settings}).snn
        assert snn.config["threshold_rule"] == "mse"
        assert not any(torch.allclose(theta.flatten(), thresholds[name].flatten())
                       for name, theta in qann_thresholds(snn).items())
    assert notes == [f"the checkpoint was fine-tuned at 3 bits; calibrating new thresholds at {bits} bits instead of "
                     "using its own" for bits in (4, 3)] + [
        "thresholds are chosen for the T = 4 levels of rate-coded neurons, the checkpoint's were fine-tuned for 7 "
        "levels: calibrating new ones (--threshold-levels bits keeps them)"]


def test_checkpoint_config_takes_the_fine_tuned_bits(digits):
    _, loaded = digits
    tuned, _ = fine_tuned(loaded, qbits=2)
    assert checkpoint_config(loaded).quantization.qbits == 4
    assert checkpoint_config(tuned) == ConversionConfig.from_dict({"qbits": 2})
    assert checkpoint_config(tuned, qbits={"first": 8}).quantization.qbits == {"default": 2, "first": 8}
    assert checkpoint_config(loaded, ConversionConfig.from_dict({"T": 8}), neuron="signed") == \
        ConversionConfig.from_dict({"T": 8, "neuron": "signed"})
    poisson = checkpoint_config(loaded, encoding="poisson").encoding
    assert poisson.input_mean == pytest.approx([0.13]) and poisson.input_std == pytest.approx([0.31])
    given = checkpoint_config(loaded, ConversionConfig.from_dict({"encoding": "regular", "input_std": [0.5]}))
    assert (given.encoding.input_mean, given.encoding.input_std) == ((0.0,), (0.5,))
    with pytest.raises(ValueError, match="unknown conversion setting 'steps'"):
        checkpoint_config(loaded, steps=3)


def test_a_checkpoint_fine_tuned_with_quantized_streams_converts_them_with_signed_neurons(digits):
    _, loaded = digits
    tuned, _ = fine_tuned(loaded, qbits=2)
    streams = dataclasses.replace(tuned, quantization={**tuned.quantization, "quantize_streams": True})
    assert checkpoint_config(streams) == ConversionConfig.from_dict({"qbits": 2, "quantize_streams": True,
                                                                     "neuron": "signed"})
    assert checkpoint_config(streams, neuron="signed-rate").neuron.kind == "signed-rate"
    with pytest.raises(ValueError, match="quantized streams need neurons that fire negative spikes"):
        checkpoint_config(streams, neuron="if")


def test_pruning_and_bit_budget_are_recorded(digits):
    _, loaded = digits
    snn, _, ann, _ = convert_checkpoint(loaded, T=4, pruning=Pruning(0.5), execution=FAST, **DATA)
    assert snn.config["pruning"]["mode"] == "magnitude" and abs(snn.config["pruning"]["sparsity"] - 0.5) < 0.05
    weights = torch.cat([p.flatten() for name, p in ann.named_parameters() if name.endswith("weight") and p.dim() > 1])
    assert abs(float((weights == 0).float().mean()) - 0.5) < 0.05
    assert float((loaded.model[0].weight == 0).float().mean()) < 0.5, "the loaded model itself is not pruned"

    snn = convert_checkpoint(loaded, T=4, qbits={"last": 8}, qbits_budget=4.0, execution=FAST, **DATA).snn
    allocation = snn.config["qbits_allocation"]
    assert allocation["mean_bits"] <= 4.0 and allocation["pinned"] == {"9": 8}
    assert snn.config["qbits_per_layer"] == allocation["bits"]


def test_pruning_is_checked_when_built():
    with pytest.raises(ValueError, match="fraction"):
        Pruning(1.5)
    with pytest.raises(ValueError, match="unknown pruning mode 'filter'"):
        Pruning(0.5, mode="filter")
    with pytest.raises(ValueError, match="needs labelled data"):
        Pruning(0.5, finetune_epochs=1)


def test_exported_from_the_package():
    assert ann2snn.convert_checkpoint is convert_checkpoint and ann2snn.ConversionConfig is ConversionConfig
    assert {"convert_checkpoint", "evaluate_saved", "write_conversion", "ConversionConfig"} <= set(ann2snn.__all__)
