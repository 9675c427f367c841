"""ConversionConfig: one object for every setting of a conversion, validated once, with a flat record that
report.json, snn.pt and calibration/baselines.json hold."""
from __future__ import annotations

import dataclasses
import json

import pytest

from ann2snn.config import (
    RECORD_KEYS,
    ConversionConfig,
    EncodingConfig,
    NeuronConfig,
    QuantizationConfig,
    SimulationConfig,
    channelwise_thresholds,
    quantization_config,
)


def test_defaults_are_todays():
    config = ConversionConfig()
    assert config.to_dict() == {"T": 32, "neuron": "if", "max_spikes_per_step": 1, "neuron_options": {},
                                "encoding": "direct", "qbits": 4, "threshold_rule": "mse", "per_channel": None,
                                "threshold_levels": "steps", "snn_calibration_images": 64}
    assert config.readout_delay == 0.5
    assert config.threshold_level_count == 32
    assert ConversionConfig.from_dict({"threshold_levels": "bits", "T": 8}).threshold_level_count is None
    assert ConversionConfig.from_dict({"T": 8}).threshold_level_count == 8
    assert (config.quantization.percentile, config.encoding.seed, config.simulation.chunk_size) == (99.99, 0, None)


@pytest.mark.parametrize("record", [
    {},
    {"qbits": {"default": 4, "first": 8, "layer1.relu": 2}, "threshold_rule": "percentile", "percentile": 99.9,
     "per_channel": True},
    {"T": 7, "chunk_size": 3, "neuron": "lif", "neuron_options": {"decay": 0.9, "compensate_leak": False}},
    {"neuron": "adaptive", "neuron_options": {"adapt_increase": 0.1}, "encoding": "poisson", "encoding_seed": 5,
     "input_mean": [0.485, 0.456, 0.406], "input_std": [0.229, 0.224, 0.225]},
    {"neuron": "signed", "max_spikes_per_step": 4, "threshold_rule": "max"},
    {"neuron": "signed-rate", "encoding": "regular"},
    {"threshold_levels": "bits", "snn_calibration": "none", "readout_delay": 0.0},
    {"T": 8, "snn_calibration": "bias", "snn_calibration_images": 16, "readout_delay": 0.25},
], ids=["defaults", "quantization", "lif", "poisson", "signed", "regular", "uncalibrated", "calibration images"])
def test_record_round_trip_is_exact(record):
    config = ConversionConfig.from_dict(record)
    written = config.to_dict()
    assert ConversionConfig.from_dict(written) == config
    assert ConversionConfig.from_dict(json.loads(json.dumps(written))) == config
    assert ConversionConfig.from_dict(written).to_dict() == written
    assert set(written) <= set(RECORD_KEYS)


def test_record_keeps_reports_key_order_and_leaves_out_what_does_not_apply():
    """report.json's "config" lists the settings in this order, and only those that apply."""
    config = ConversionConfig.from_dict({"neuron": "signed-rate", "per_channel": True, "threshold_rule": "percentile"})
    assert list(config.to_dict().items()) == [
        ("T", 32), ("neuron", "signed-rate"), ("max_spikes_per_step", 1), ("neuron_options", {}),
        ("encoding", "direct"), ("qbits", 4), ("threshold_rule", "percentile"), ("per_channel", True),
        ("percentile", 99.99), ("threshold_levels", "steps"),
        ("snn_calibration_images", 64)]
    # SNN calibration does not apply to accumulate coding (signed neurons equal the QANN), nor its images
    # without a method
    signed = ConversionConfig.from_dict({"neuron": "signed", "threshold_levels": "steps", "snn_calibration": "bias",
                                         "readout_delay": 0.5})
    assert signed == ConversionConfig.from_dict({"neuron": "signed"}) and "snn_calibration" not in signed.to_dict()
    assert "readout_delay" not in signed.to_dict() and signed.readout_delay == 0
    assert "snn_calibration_images" not in ConversionConfig.from_dict(
        {"snn_calibration": "none", "snn_calibration_images": 9}).to_dict()
    # a percentile under another rule, a seed without Poisson spikes, a normalisation without spikes: ignored
    ignored = ConversionConfig.from_dict({"threshold_rule": "mse", "percentile": 50.0, "encoding_seed": 3,
                                          "input_mean": [0.5], "input_std": [0.2]})
    assert ignored == ConversionConfig() and ignored.to_dict() == ConversionConfig().to_dict()
    regular = ConversionConfig.from_dict({"encoding": "regular", "encoding_seed": 3}).to_dict()
    assert (regular["input_mean"], regular["input_std"]) == ([0.0], [1.0]) and "encoding_seed" not in regular


def test_the_read_out_delay_is_the_neurons_unless_given():
    assert [ConversionConfig.from_dict({"neuron": kind}).readout_delay
            for kind in ("if", "lif", "adaptive", "signed-rate", "signed")] == [0.5, 0.5, 0.5, 0.0, 0.0]
    assert ConversionConfig.from_dict({"neuron": "signed-rate", "readout_delay": 0.25}).readout_delay == 0.25
    assert ConversionConfig.from_dict({"readout_delay": 0}).readout_delay == 0.0
    # a changed neuron brings its own delay, as a given one stays
    assert ConversionConfig().replace(neuron="signed-rate").readout_delay == 0.0
    assert ConversionConfig.from_dict({"readout_delay": 0.25}).replace(neuron="lif").readout_delay == 0.25


def test_thresholds_are_per_channel_by_default_where_they_are_chosen_for_the_steps():
    assert ConversionConfig().channelwise_thresholds
    for record in ({"threshold_levels": "bits"}, {"neuron": "signed"}, {"neuron": "signed", "T": 8},
                   {"per_channel": False}):
        assert not ConversionConfig.from_dict(record).channelwise_thresholds, record
    assert ConversionConfig.from_dict({"neuron": "signed", "per_channel": True}).channelwise_thresholds
    # the decision is remade when the settings change
    assert not ConversionConfig().replace(threshold_levels="bits").channelwise_thresholds
    # alone, a QuantizationConfig does not know the neurons: per layer
    assert not channelwise_thresholds(QuantizationConfig(), None)
    assert channelwise_thresholds(QuantizationConfig(), 8)
    assert not channelwise_thresholds(QuantizationConfig(per_channel=False), 8)


def test_normalisation_is_held_as_the_encoder_holds_it():
    """float32, as the InputEncoder's buffers, which today's reports recorded."""
    record = ConversionConfig.from_dict({"encoding": "poisson", "input_mean": [0.485], "input_std": 0.229}).to_dict()
    assert record["input_mean"] == [0.48500001430511475] and record["input_std"] == [0.2290000021457672]


@pytest.mark.parametrize("record, message", [
    ({"T": 0}, "T must be a positive integer number of time steps, got 0"),
    ({"T": 2.0}, "T must be a positive integer"),
    ({"chunk_size": -1}, "chunk_size must be a positive integer"),
    ({"qbits": 9}, "qbits must be an integer in 1..8, got 9"),
    ({"qbits": True}, "qbits must be an integer in 1..8"),
    ({"qbits": {}}, "the qbits mapping is empty"),
    ({"qbits": {"first": 0}}, "qbits of 'first' must be an integer in 1..8"),
    ({"threshold_rule": "median"}, "unknown threshold rule 'median'"),
    ({"threshold_rule": "percentile", "percentile": 0}, "percentile must be in (0, 100], got 0"),
    ({"threshold_rule": "percentile", "percentile": 100.5}, "percentile must be in (0, 100]"),
    ({"per_channel": "yes"}, "per_channel must be True, False or None"),
    ({"readout_delay": 1.0}, "the read-out delay must be a fraction of T in [0, 1), got 1.0"),
    ({"readout_delay": -0.1}, "the read-out delay must be a fraction of T in [0, 1)"),
    ({"readout_delay": "half"}, "the read-out delay must be a fraction of T in [0, 1)"),
    ({"neuron": "izhikevich"}, "unknown neuron 'izhikevich'"),
    ({"threshold_levels": "many"}, "unknown threshold levels 'many'; choose one of ('steps', 'bits')"),
    ({"snn_calibration": "fancy"}, "unknown SNN calibration 'fancy'; choose one of ('none', 'bias', 'weights')"),
    ({"snn_calibration_images": 0}, "the number of SNN calibration images must be a positive integer, got 0"),
    ({"max_spikes_per_step": 0}, "max_spikes_per_step must be a positive integer, got 0"),
    ({"max_spikes_per_step": True}, "max_spikes_per_step must be a positive integer"),
    ({"neuron": "if", "neuron_options": {"decay": 0.9}}, "neuron 'if' has no option 'decay'; it takes no options"),
    ({"neuron": "lif", "neuron_options": {"leak": 0.9}}, "neuron 'lif' has no option 'leak'; it takes decay, "
                                                         "compensate_leak"),
    ({"encoding": "rate"}, "unknown encoding 'rate'"),
    ({"encoding": "poisson", "encoding_seed": 1.5}, "encoding seed must be an integer"),
    ({"encoding": "regular", "input_std": [0.2, 0.0]}, "positive finite stds"),
    ({"encoding": "regular", "input_mean": [float("nan")]}, "finite means"),
    ({"neuron": "signed", "encoding": "poisson"}, "'poisson' needs rate-coded neurons, but neuron='signed'"),
    ({"qbits": 4, "bits": 4, "steps": 3}, "unknown conversion settings 'bits', 'steps'; the settings are qbits"),
])
def test_refused_when_built(record, message):
    with pytest.raises(ValueError) as error:
        ConversionConfig.from_dict(record)
    assert message in str(error.value)


def test_parts_are_frozen_and_checked():
    config = ConversionConfig(neuron=NeuronConfig("lif", options={"decay": 0.9}), simulation=SimulationConfig(T=8))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.simulation.T = 4  # type: ignore[misc]
    with pytest.raises(TypeError, match="neuron must be a NeuronConfig"):
        ConversionConfig(neuron="lif")  # type: ignore[arg-type]
    assert config.replace(T=16).simulation == SimulationConfig(T=16)
    assert config.replace(T=16).neuron == config.neuron
    assert EncodingConfig().to_dict() == {"encoding": "direct"}


def test_quantization_config_shorthands():
    assert quantization_config() == QuantizationConfig()
    assert quantization_config(3) == QuantizationConfig(qbits=3)
    assert quantization_config({"default": 2}, per_channel=True) == QuantizationConfig({"default": 2}, per_channel=True)
    conversion = ConversionConfig.from_dict({"qbits": 2, "neuron": "signed"})
    assert quantization_config(conversion, threshold_rule="max") == QuantizationConfig(2, threshold_rule="max")


def test_the_neuron_kind_decides_the_default_snn_calibration():
    """`if` gets the weight calibration, whose window model is an IF neuron's; kinds that leak, adapt or take
    spikes back keep the bias calibration; a given method wins, and switching the neuron re-decides."""
    assert ConversionConfig().snn_calibration == "weights"
    for kind in ("lif", "adaptive", "signed-rate"):
        assert ConversionConfig.from_dict({"neuron": kind}).snn_calibration == "bias"
    assert ConversionConfig.from_dict({"neuron": "signed"}).snn_calibration == "none"
    assert ConversionConfig.from_dict({"snn_calibration": "bias"}).snn_calibration == "bias"
    assert ConversionConfig().replace(neuron="lif").snn_calibration == "bias"
    assert ConversionConfig.from_dict({"neuron": "lif", "snn_calibration": "weights"}).snn_calibration == "weights"
