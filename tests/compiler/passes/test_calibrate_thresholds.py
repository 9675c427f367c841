"""Pass 7 (calibrate_thresholds): observers collect activation statistics and set each quantizer's threshold."""
from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import ann2snn
from ann2snn.compiler.pass_manager import run_passes
from ann2snn.compiler.passes import calibrate_thresholds, insert_quantizers, normalize_activations, observing, trace
from ann2snn.compiler.quantizer import QCFSQuantizer

BINS = 2048


class CalibNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, groups=6)
        self.relu2 = nn.ReLU6()
        self.fc = nn.Linear(6 * 25, 8)
        self.relu3 = nn.ReLU()
        self.out = nn.Linear(8, 3)
        with torch.no_grad():
            self.conv2.weight.mul_(8.0)  # so that ReLU6 clips some values

    def forward(self, x):
        x = self.relu2(self.conv2(self.relu1(self.conv1(x))))
        return self.out(self.relu3(self.fc(x.flatten(1))))


ACTIVATIONS = ("relu1", "relu2", "relu3")


def calibration_data(n_batches: int = 3):
    torch.manual_seed(3)
    return [torch.randn(8, 3, 5, 5) for _ in range(n_batches)]


def eager_activations(model: nn.Module, batches) -> dict[str, torch.Tensor]:
    """Every activation's outputs over the calibration data, as [N, C, ...] tensors."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in ACTIVATIONS}
    hooks = [getattr(model, name).register_forward_hook(lambda m, i, o, name=name: seen[name].append(o.detach()))
             for name in ACTIVATIONS]
    with torch.no_grad():
        for x in batches:
            model(x)
    for hook in hooks:
        hook.remove()
    return {name: torch.cat(values) for name, values in seen.items()}


def per_channel_values(y: torch.Tensor) -> list[torch.Tensor]:
    return list(y.transpose(0, 1).reshape(y.shape[1], -1))


def quant_mse(values: torch.Tensor, theta: float, levels: int) -> float:
    v = values.double()
    s = theta / levels
    q = s * torch.clamp(torch.floor(v / s + 0.5), 0, levels)
    return float(((q - v) ** 2).mean())


def bin_width(maximum: float) -> float:
    """The observer's histogram covers [0, R), R the smallest power of two above the maximum."""
    r = 2.0 ** math.ceil(math.log2(maximum))
    if r <= maximum:
        r *= 2
    return r / BINS


@pytest.fixture(scope="module")
def model_and_acts():
    torch.manual_seed(0)
    model = CalibNet().eval()
    return model, eager_activations(model, calibration_data())


def calibrated(model, rule: str, qbits: int = 3, per_channel: bool = False, percentile: float = 99.99, batches=None):
    return ann2snn.quantize(model, calibration_data() if batches is None else batches, qbits,
                            threshold_rule=rule, per_channel=per_channel, percentile=percentile)


def test_max_rule_is_the_true_max(model_and_acts) -> None:
    model, acts = model_and_acts
    assert float(acts["relu2"].max()) == 6.0  # the ReLU6 clip is reached
    qann = calibrated(model, "max")
    for name in ACTIVATIONS:
        q = qann.get_submodule(name)
        assert isinstance(q, QCFSQuantizer) and q.theta.shape == ()
        assert float(q.theta) == float(acts[name].max()), name


def test_max_rule_per_channel(model_and_acts) -> None:
    model, acts = model_and_acts
    qann = calibrated(model, "max", per_channel=True)
    for name in ACTIVATIONS:
        theta = qann.get_submodule(name).theta
        y = acts[name]
        expected_shape = (1, y.shape[1], 1, 1) if y.ndim == 4 else (1, y.shape[1])
        assert theta.shape == expected_shape, name
        expected = torch.stack([c.max() for c in per_channel_values(y)]).clamp_min(torch.finfo(torch.float32).tiny)
        torch.testing.assert_close(theta.flatten(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("percentile", [90.0, 99.0, 99.9])
def test_percentile_rule_within_one_bin(model_and_acts, percentile: float) -> None:
    model, acts = model_and_acts
    qann = calibrated(model, "percentile", percentile=percentile)
    for name in ACTIVATIONS:
        values = acts[name].flatten().numpy()
        positive = values[values > 0]
        reference = float(np.percentile(positive, percentile, method="inverted_cdf"))
        theta = float(qann.get_submodule(name).theta)
        assert abs(theta - reference) <= bin_width(float(values.max())) * (1 + 1e-6), (name, theta, reference)
        assert theta <= values.max()


def test_percentile_rule_per_channel(model_and_acts) -> None:
    model, acts = model_and_acts
    qann = calibrated(model, "percentile", per_channel=True, percentile=95.0)
    for name in ACTIVATIONS:
        theta = qann.get_submodule(name).theta.flatten()
        channels = per_channel_values(acts[name])
        assert theta.numel() == len(channels)
        # per channel histograms share the layer's range (its overall maximum)
        width = bin_width(float(acts[name].max()))
        for c, values in enumerate(channels):
            positive = values[values > 0].numpy()
            if positive.size == 0:
                continue
            expected = float(np.percentile(positive, 95.0, method="inverted_cdf"))
            assert abs(float(theta[c]) - expected) <= width * (1 + 1e-6), (name, c)


@pytest.mark.parametrize("qbits", [1, 2, 4])
def test_mse_rule_beats_max_and_percentile(model_and_acts, qbits: int) -> None:
    model, acts = model_and_acts
    levels = 2 ** qbits - 1
    thresholds = {rule: calibrated(model, rule, qbits) for rule in ("mse", "max")}
    for p in (99.0, 99.9, 99.99):
        thresholds[f"p{p}"] = calibrated(model, "percentile", qbits, percentile=p)
    for name in ACTIVATIONS:
        errors = {rule: quant_mse(acts[name].flatten(), float(qann.get_submodule(name).theta), levels)
                  for rule, qann in thresholds.items()}
        assert all(errors["mse"] <= err for err in errors.values()), (name, errors)
        if name != "relu3":  # conv activations: long tails, clipping pays off
            assert errors["mse"] < 0.9 * errors["max"], (name, errors)


def test_loader_batch_formats_are_equivalent(model_and_acts) -> None:
    model, _ = model_and_acts
    batches = calibration_data()
    plain = calibrated(model, "max", batches=batches)
    tuples = calibrated(model, "max", batches=[(x, torch.zeros(8)) for x in batches])
    dicts = calibrated(model, "max", batches=[{"image": x, "label": torch.zeros(8)} for x in batches])
    for name in ACTIVATIONS:
        for other in (tuples, dicts):
            assert float(other.get_submodule(name).theta) == float(plain.get_submodule(name).theta)


def _uncalibrated(qbits: int = 2):
    return run_passes(CalibNet().eval(), trace, normalize_activations, partial(insert_quantizers, qbits=qbits))


def test_calibration_sets_every_quantizer_and_leaves_no_observer() -> None:
    gm = run_passes(_uncalibrated(), partial(calibrate_thresholds, batches=calibration_data(1), rule="mse"))
    quantizers = [m for m in gm.modules() if isinstance(m, QCFSQuantizer)]
    assert len(quantizers) == 3
    assert all(q.calibrated and q.observer is None for q in quantizers)
    # after calibration the quantized output is on the grid of each quantizer
    x = torch.randn(4, 3, 5, 5)
    levels = gm.get_submodule("relu1")(torch.randn(100) * 3) / gm.get_submodule("relu1").step
    torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
    assert torch.isfinite(gm(x)).all()


def test_empty_loader_raises_value_error() -> None:
    with pytest.raises(ValueError, match="no batches"):
        calibrate_thresholds(_uncalibrated(), [], rule="max")
    with pytest.raises(ValueError, match="no batches"):
        calibrate_thresholds(_uncalibrated(), iter(()), rule="max")


def test_observing_restores_even_on_exception() -> None:
    gm = _uncalibrated()
    with pytest.raises(KeyError):
        with observing(gm) as quantizers:
            assert len(quantizers) == 3
            assert all(q.observer is not None for q in quantizers.values())
            # while observing the quantizers act as the float activations (ReLU6 clips at 6)
            gm(torch.randn(2, 3, 5, 5))
            assert float(quantizers["relu2"].observer.max) <= 6.0
            raise KeyError("boom")
    assert all(m.observer is None for m in gm.modules() if isinstance(m, QCFSQuantizer))


def test_observing_acts_as_float_activation() -> None:
    torch.manual_seed(0)
    model = CalibNet().eval()
    gm = _uncalibrated()
    gm.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(3, 3, 5, 5)
    with observing(gm), torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)
