"""The settings of a conversion, in one object: how the ANN is quantized, which neurons stand for its
activations, how the input reaches the first layer and how many steps are simulated.

Every default lives here, and a configuration is validated once, when it is built, so that the passes,
the runtime, the CLI and the tools take its values as given. `to_dict` is the flat record that
`report.json` ("config"), `snn.pt`'s metadata and `calibration/baselines.json` ("conversion") hold;
`from_dict` reads it back and names any key it does not know. Settings that do not apply (a percentile
under another threshold rule, an encoding seed without Poisson spikes, ...) are not recorded and hold
their defaults, so that `from_dict(c.to_dict()) == c` and two conversions that behave alike compare equal.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ann2snn.compiler.observers import THRESHOLD_RULES
from ann2snn.compiler.passes.calibrate_spiking import NO_CALIBRATION, SPIKING_CALIBRATIONS
from ann2snn.compiler.passes.reconstruct_blocks import NO_RECONSTRUCTION, RECONSTRUCTIONS
from ann2snn.compiler.qbits import QBits, check_qbits_spec
from ann2snn.runtime.coding import RATE
from ann2snn.runtime.encoding import SPIKE_ENCODINGS, check_encoding
from ann2snn.runtime.network import check_readout_delay, check_steps
from ann2snn.runtime.neuron_kinds import neuron_kind, symmetric_neuron_kinds

PERCENTILE_RULE = "percentile"
POISSON = "poisson"
THRESHOLD_LEVELS = ("steps", "bits")


def _positive_int(what: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")


def _set(instance: Any, name: str, value: Any) -> None:
    """Normalise a field of a frozen instance while it is being built."""
    object.__setattr__(instance, name, value)


@dataclass(frozen=True)
class QuantizationConfig:
    """The QANN: `qbits` bits per activation (one number, or a mapping as in `ann2snn.compiler.qbits`),
    thresholds calibrated by `threshold_rule` (`percentile` takes the `percentile`-th percentile), per
    layer or per channel (`per_channel` None, default: see `channelwise_thresholds`), then, by `reconstruction`
    (a method of `ann2snn.compiler.passes.reconstruct_blocks.RECONSTRUCTIONS`, "none" by default), fitted block by
    block to the float ANN on the calibration images (not with fine-tuned thresholds, which need no fitting).
    `quantize_streams` also quantizes, symmetrically, the linear values weighted layers read (MobileNetV2's
    bottleneck outputs and residual stream: see `ann2snn.compiler.passes.mark_streams`), so that the SNN's every
    synaptic layer after the first is spike-driven; it needs neurons that fire negative spikes (`signed`,
    `signed-rate`)."""

    qbits: QBits = 4
    threshold_rule: str = "mse"
    percentile: float = 99.99
    per_channel: bool | None = None
    reconstruction: str = NO_RECONSTRUCTION
    quantize_streams: bool = False

    def __post_init__(self) -> None:
        check_qbits_spec(self.qbits)
        if isinstance(self.qbits, Mapping):
            _set(self, "qbits", dict(self.qbits))
        if self.threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"unknown threshold rule {self.threshold_rule!r}; choose one of {tuple(THRESHOLD_RULES)}")
        if self.threshold_rule != PERCENTILE_RULE:
            _set(self, "percentile", QuantizationConfig.percentile)
        elif isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 0 < self.percentile <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.per_channel is not None and not isinstance(self.per_channel, bool):
            raise ValueError(f"per_channel must be True, False or None, got {self.per_channel!r}")
        if self.reconstruction not in RECONSTRUCTIONS:
            raise ValueError(f"unknown reconstruction {self.reconstruction!r}; choose one of {tuple(RECONSTRUCTIONS)}")
        if not isinstance(self.quantize_streams, bool):
            raise ValueError(f"quantize_streams must be True or False, got {self.quantize_streams!r}")

    def to_dict(self) -> dict[str, Any]:
        record = {"qbits": dict(self.qbits) if isinstance(self.qbits, Mapping) else self.qbits,
                  "threshold_rule": self.threshold_rule, "per_channel": self.per_channel}
        if self.threshold_rule == PERCENTILE_RULE:
            record["percentile"] = self.percentile
        if self.reconstruction != NO_RECONSTRUCTION:
            record["reconstruction"] = self.reconstruction
        if self.quantize_streams:
            record["quantize_streams"] = True
        return record


@dataclass(frozen=True)
class SimulationConfig:
    """`T` steps per call of the network, simulated `chunk_size` steps per batched call (None: planned
    from the memory available)."""

    T: int = 32
    chunk_size: int | None = None

    def __post_init__(self) -> None:
        check_steps("T", self.T)
        if self.chunk_size is not None:
            check_steps("chunk_size", self.chunk_size)

    def to_dict(self) -> dict[str, Any]:
        return {"T": self.T, **({"chunk_size": self.chunk_size} if self.chunk_size is not None else {})}


@dataclass(frozen=True)
class NeuronConfig:
    """The neuron kind (a name of `ann2snn.runtime.neuron_kinds.NEURON_KINDS`), bursts of up to
    `max_spikes_per_step` spikes per step, and the kind's own `options` (e.g. decay for 'lif')."""

    kind: str = "if"
    max_spikes_per_step: int = 1
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        accepted = neuron_kind(self.kind).options
        _positive_int("max_spikes_per_step", self.max_spikes_per_step)
        if not isinstance(self.options, Mapping):
            raise ValueError(f"neuron options must be a mapping of option names to values, got {self.options!r}")
        if unknown := sorted(set(self.options) - set(accepted)):
            takes = f"takes {', '.join(accepted)}" if accepted else "takes no options"
            raise ValueError(f"neuron {self.kind!r} has no option {', '.join(map(repr, unknown))}; it {takes}")
        _set(self, "options", dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        return {"neuron": self.kind, "max_spikes_per_step": self.max_spikes_per_step,
                "neuron_options": dict(self.options)}


@dataclass(frozen=True)
class SpikingCalibrationConfig:
    """How a rate-coded network is fitted to the steps it runs (0/1-spike and signed-rate neurons; accumulate
    coding equals the QANN already, and these settings do not apply to it).

    `threshold_levels`: the levels the activation thresholds are chosen for, "steps" (T: the resolution a
    rate-coded neuron has in T steps, default) or "bits" (the QANN's 2**qbits - 1). `method`: the SNN
    calibration run after conversion on the first `images` calibration images (see
    `ann2snn.compiler.passes.calibrate_spiking.SPIKING_CALIBRATIONS`): "weights" (the feeding layers' weights
    refitted to the SNN's own input rates, then "bias"), "bias" (a constant current per channel), "none" to
    skip it, or None (default): the neuron kind's ("weights" for `if`, "bias" for the others: see
    `ann2snn.runtime.neuron_kinds`).
    `readout_delay`: the fraction of the T steps the read-out leaves out before it averages the output (see
    `SpikingNetwork.readout_start`), 0 to average all; None (default): the neuron kind's (see
    `ann2snn.runtime.neuron_kinds`, 0.5 for 0/1 neurons, 0 for signed-rate).

    Measured on the shared ResNet-20 (test-1000, calibrated on train-calib-512, `if`, converted for each of T = 8 /
    16 / 32, `python tools/ablation.py`): "bits", no calibration, no delay, per layer: 40.7 / 58.3 / 72.1 %;
    "steps" and "bias", per layer: 57.2 / 68.8 / 75.8 %; with the read-out over the second half: 62.7 / 73.2 /
    80.6 %; and thresholds per channel: 69.0 / 80.3 / 82.0 %. The weight calibration, `if`'s default, gives
    67.2 / 78.9 / 81.9 % there, but on deeper networks and MobileNetV2 it adds: bias / weights at T = 16 and 32,
    MobileNetV2 (`models/mobilenet_v2.pt`) 79.3 / 81.1 % and 84.9 / 85.6 %, chenyaofo's ResNet-56 T = 32 82.3 /
    83.0 %, ShuffleNetV2 x0.5 T = 32 83.3 / 83.4 % (README, "The default 0/1-spike recipe")."""

    threshold_levels: str = "steps"
    method: str | None = None
    # 64 images: 80.3 / 82.0 % at T = 16 / 32 on the shared ResNet-20, 79.8 / 82.3 % with 128 in twice the time
    images: int = 64
    readout_delay: float | None = None

    def __post_init__(self) -> None:
        if self.threshold_levels not in THRESHOLD_LEVELS:
            raise ValueError(f"unknown threshold levels {self.threshold_levels!r}; choose one of {THRESHOLD_LEVELS}")
        if self.method is not None and self.method not in SPIKING_CALIBRATIONS:
            raise ValueError(f"unknown SNN calibration {self.method!r}; choose one of {tuple(SPIKING_CALIBRATIONS)}")
        _positive_int("the number of SNN calibration images", self.images)
        if self.method == NO_CALIBRATION:
            _set(self, "images", SpikingCalibrationConfig.images)
        if self.readout_delay is not None:
            _set(self, "readout_delay", check_readout_delay(self.readout_delay, RATE))

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"threshold_levels": self.threshold_levels}
        if self.method is not None:
            record["snn_calibration"] = self.method
        if self.method != NO_CALIBRATION:
            record["snn_calibration_images"] = self.images
        if self.readout_delay is not None:
            record["readout_delay"] = self.readout_delay
        return record


def _channel_values(what: str, values: Any, default: float) -> list[float]:
    """Per-channel normalisation values as the encoder holds them (float32), so that a record read back
    equals the configuration it was written from."""
    flat = torch.as_tensor(default if values is None else values, dtype=torch.float32).flatten().tolist()
    if not flat or not all(math.isfinite(value) for value in flat):
        raise ValueError(f"input normalisation needs finite {what}, got {values!r}")
    return flat


@dataclass(frozen=True)
class EncodingConfig:
    """How the image reaches the first layer: `direct` (the analog image), or spikes of its intensity,
    `poisson` (seeded by `seed`) or `regular`, recovered with the data's per-channel normalisation
    `input_mean` and `input_std` (defaults 0 and 1: the input is the intensity itself)."""

    kind: str = "direct"
    seed: int = 0
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        check_encoding(self.kind)
        if self.kind != POISSON:
            _set(self, "seed", EncodingConfig.seed)
        elif not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"encoding seed must be an integer, got {self.seed!r}")
        if self.kind not in SPIKE_ENCODINGS:
            _set(self, "input_mean", None)
            _set(self, "input_std", None)
            return
        mean = _channel_values("means", self.input_mean, 0.0)
        std = _channel_values("stds", self.input_std, 1.0)
        if not all(value > 0 for value in std):
            raise ValueError(f"input normalisation needs finite means and positive finite stds, got mean {mean} "
                             f"and std {std}")
        _set(self, "input_mean", tuple(mean))
        _set(self, "input_std", tuple(std))

    def to_dict(self) -> dict[str, Any]:
        record: dict[str, Any] = {"encoding": self.kind}
        if self.kind in SPIKE_ENCODINGS:
            record.update(input_mean=list(self.input_mean), input_std=list(self.input_std))
        if self.kind == POISSON:
            record["encoding_seed"] = self.seed
        return record


def channelwise_thresholds(quantization: QuantizationConfig, levels: int | None) -> bool:
    """Whether the quantizers get one threshold per channel: as `per_channel` says, and where it says None,
    where the thresholds are chosen for `levels` (T) steps of rate-coded neurons. There per-channel levels
    measured +3.8 points at T = 16 on the shared ResNet-20 (see SpikingCalibrationConfig); for the QANN's own
    levels they measured no better (4 bits: 78.9 % per channel, 79.1 % per layer)."""
    return quantization.per_channel if quantization.per_channel is not None else levels is not None


def quantization_config(config: QuantizationConfig | ConversionConfig | QBits | None = None,
                        **settings: Any) -> QuantizationConfig:
    """The quantization settings a caller gives: a `QuantizationConfig`, the quantization part of a
    `ConversionConfig`, or, for short, the bits alone; keyword `settings` (qbits, threshold_rule,
    percentile, per_channel) change it, or build it on the defaults when `config` is None."""
    if isinstance(config, ConversionConfig):
        config = config.quantization
    if config is None or isinstance(config, QuantizationConfig):
        base = config or QuantizationConfig()
        return dataclasses.replace(base, **settings) if settings else base
    return QuantizationConfig(config, **settings)


# The flat record's keys and the part of the configuration each belongs to.
_PART_OF = {
    **dict.fromkeys(("qbits", "threshold_rule", "percentile", "per_channel", "reconstruction", "quantize_streams"),
                    "quantization"),
    **dict.fromkeys(("T", "chunk_size"), "simulation"),
    **dict.fromkeys(("neuron", "max_spikes_per_step", "neuron_options"), "neuron"),
    **dict.fromkeys(("encoding", "encoding_seed", "input_mean", "input_std"), "encoding"),
    **dict.fromkeys(("threshold_levels", "snn_calibration", "snn_calibration_images", "readout_delay"),
                    "calibration"),
}
# Record keys whose field has another name in its part.
_FIELD_OF = {"neuron": "kind", "neuron_options": "options", "encoding": "kind", "encoding_seed": "seed",
             "snn_calibration": "method", "snn_calibration_images": "images"}
RECORD_KEYS = tuple(_PART_OF)
QUANTIZATION_KEYS = tuple(key for key, part in _PART_OF.items() if part == "quantization")


@dataclass(frozen=True)
class ConversionConfig:
    """Everything a conversion is told: see the parts. Build it whole, from parts, or from the flat
    record (`from_dict`, the keyword arguments of `ann2snn.convert`)."""

    quantization: QuantizationConfig = field(default_factory=QuantizationConfig)
    neuron: NeuronConfig = field(default_factory=NeuronConfig)
    encoding: EncodingConfig = field(default_factory=EncodingConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    calibration: SpikingCalibrationConfig = field(default_factory=SpikingCalibrationConfig)

    def __post_init__(self) -> None:
        for name, part in _PARTS.items():
            if not isinstance(getattr(self, name), part):
                raise TypeError(f"{name} must be a {part.__name__}, got {type(getattr(self, name)).__name__}")
        kind = neuron_kind(self.neuron.kind)
        check_encoding(self.encoding.kind, kind.coding.name, kind.name)
        if self.quantization.quantize_streams and kind.build_symmetric is None:
            raise ValueError(f"quantized streams need neurons that fire negative spikes, and {kind.name!r} neurons "
                             f"do not: use one of {symmetric_neuron_kinds()}, or leave the streams analog")
        if not self.rate_coded:
            # accumulate coding equals the QANN already: nothing to fit, and every step's output counts
            _set(self, "calibration", SpikingCalibrationConfig(method=NO_CALIBRATION))

    @property
    def rate_coded(self) -> bool:
        """Whether the neurons are rate-coded (the calibration part applies)."""
        return not neuron_kind(self.neuron.kind).coding.inject_once

    @property
    def threshold_level_count(self) -> int | None:
        """The levels the thresholds are chosen for when they are not the quantizers' own: T, for rate-coded
        neurons whose calibration says "steps"."""
        return self.simulation.T if self.rate_coded and self.calibration.threshold_levels == "steps" else None

    @property
    def snn_calibration(self) -> str:
        """The SNN calibration the network gets: the calibration part's, else the neuron kind's; none for
        accumulate coding."""
        if not self.rate_coded:
            return NO_CALIBRATION
        given = self.calibration.method
        return given if given is not None else neuron_kind(self.neuron.kind).snn_calibration

    @property
    def calibrates_spiking(self) -> bool:
        """Whether the converted network is fitted by an SNN calibration (rate-coded neurons, a method)."""
        return self.snn_calibration != NO_CALIBRATION

    @property
    def readout_delay(self) -> float:
        """The read-out delay the network gets: the calibration part's, else the neuron kind's; 0 for
        accumulate coding, which sums every step."""
        if not self.rate_coded:
            return 0.0
        given = self.calibration.readout_delay
        return given if given is not None else neuron_kind(self.neuron.kind).readout_delay

    @property
    def channelwise_thresholds(self) -> bool:
        """Whether each channel gets its own threshold (see `channelwise_thresholds`)."""
        return channelwise_thresholds(self.quantization, self.threshold_level_count)

    def to_dict(self) -> dict[str, Any]:
        """The flat record, in the order `report.json` has always listed it (the calibration part last, and
        only for rate-coded neurons)."""
        return {**self.simulation.to_dict(), **self.neuron.to_dict(), **self.encoding.to_dict(),
                **self.quantization.to_dict(), **(self.calibration.to_dict() if self.rate_coded else {})}

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> ConversionConfig:
        """The configuration a flat record describes; keys it leaves out take their defaults."""
        if unknown := [key for key in record if key not in _PART_OF]:
            raise ValueError(f"unknown conversion setting{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                             f"the settings are {', '.join(RECORD_KEYS)}")
        parts: dict[str, dict[str, Any]] = {}
        for key, value in record.items():
            parts.setdefault(_PART_OF[key], {})[_FIELD_OF.get(key, key)] = value
        return cls(**{name: _PARTS[name](**values) for name, values in parts.items()})

    def replace(self, **settings: Any) -> ConversionConfig:
        """This configuration with some settings (record keys, as in `from_dict`) changed."""
        return ConversionConfig.from_dict({**self.to_dict(), **settings})


_PARTS = {"quantization": QuantizationConfig, "neuron": NeuronConfig, "encoding": EncodingConfig,
          "simulation": SimulationConfig, "calibration": SpikingCalibrationConfig}
