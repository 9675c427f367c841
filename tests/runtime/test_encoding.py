"""Input encodings: regular and Poisson spike rates, independence of batching and chunking, convergence of an
encoded SNN to the directly fed one, the encoder's place in the graph, and the command line."""
from __future__ import annotations

import json
import math

import pytest
import torch

import ann2snn
from ann2snn.runtime.encoding import InputEncoder
from tests.helpers import assert_rel_close, digits_args, digits_checkpoint, run_cli
from tests.networks import build

MEAN, STD = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]


def intensities(n: int, generator: torch.Generator) -> torch.Tensor:
    """Pixel intensities in [0, 1], exactly 0 and 1 included."""
    p = torch.rand(n, 3, 8, 8, generator=generator)
    p[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    return p


def normalised(p: torch.Tensor) -> torch.Tensor:
    return (p - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def encode(encoder: InputEncoder, x: torch.Tensor, t0: int, steps: int) -> torch.Tensor:
    """The encoder's output for steps t0 .. t0 + steps - 1 of the images x, as [steps, batch, ...]."""
    encoder.set_window(t0, steps)
    return encoder(x.repeat(steps, *([1] * (x.ndim - 1)))).reshape((steps,) + tuple(x.shape))


def spike_trains(encoder: InputEncoder, p: torch.Tensor, T: int) -> torch.Tensor:
    """Binary spikes [T, batch, ...] for intensities p, from an encoder without normalisation."""
    spikes = encode(encoder, p, 0, T)
    assert set(spikes.unique().tolist()) <= {0.0, 1.0}
    return spikes


def test_regular_spike_count_is_within_one_of_p_times_T() -> None:
    p = intensities(4, torch.Generator().manual_seed(0))
    for T in (1, 7, 64, 301):
        count = spike_trains(InputEncoder("regular"), p, T).sum(0)
        assert float((count - p * T).abs().max()) <= 1.0, T
    # evenly spaced: over any window of w steps, a pixel spikes floor or ceil of about p * w times
    window_counts = spike_trains(InputEncoder("regular"), p, 64)[10:30].sum(0)
    assert float((window_counts - p * 20).abs().max()) <= 1.0


def test_poisson_rate_is_within_a_binomial_bound() -> None:
    p = intensities(4, torch.Generator().manual_seed(1))
    T = 4000
    spikes = spike_trains(InputEncoder("poisson", seed=5), p, T)
    rate = spikes.mean(0)
    sigma = torch.sqrt(p * (1 - p) / T)
    # 768 pixels: a 5.5-sigma deviation anywhere has probability below 1e-5 for a true Bernoulli source
    assert bool(((rate - p).abs() <= 5.5 * sigma + 1e-9).all())
    assert float(rate.flatten()[0]) == 0.0 and float(rate.flatten()[1]) == 1.0  # p = 0 and p = 1 exactly
    # the mean over all pixels, a binomial of T * 768 draws, lies much closer
    assert abs(float(rate.mean() - p.mean())) <= 5 * float(torch.sqrt((p * (1 - p)).sum()) / (T * p.numel()))
    # steps and neighbouring pixels are not correlated
    centred = spikes - p
    lag_one = float((centred[1:] * centred[:-1]).mean() / (p * (1 - p)).mean())
    neighbours = float((centred[..., 1:] * centred[..., :-1]).mean() / (p * (1 - p)).mean())
    assert abs(lag_one) < 0.01 and abs(neighbours) < 0.01


@pytest.mark.parametrize("encoding", ["regular", "poisson"])
def test_time_average_of_the_normalised_output_is_the_input(encoding: str) -> None:
    p = intensities(3, torch.Generator().manual_seed(2))
    x = normalised(p)
    T = 2000
    average = encode(InputEncoder(encoding, MEAN, STD), x, 0, T).mean(0)
    bound = 1 / T if encoding == "regular" else 6 / math.sqrt(T)  # one spike; six sigma of the worst pixel
    assert float(((average - x) * torch.tensor(STD).view(1, 3, 1, 1)).abs().max()) <= bound
    # outside [0, 1] the intensity is clipped
    assert torch.equal(encode(InputEncoder(encoding, MEAN, STD), normalised(p + 2), 0, 3),
                       normalised(torch.ones(3, *p.shape)))


def test_poisson_spikes_depend_on_seed_image_step_and_position_only() -> None:
    generator = torch.Generator().manual_seed(3)
    x = normalised(intensities(5, generator))
    encoder = InputEncoder("poisson", MEAN, STD, seed=11)
    whole = encode(encoder, x, 0, 12)
    # other batch compositions and orders, other time windows: the same spikes for the same image and step
    order = torch.tensor([3, 0, 4])
    assert torch.equal(encode(encoder, x[order], 5, 7), whole[5:, order])
    assert torch.equal(encode(encoder, x[2:3], 0, 1), whole[:1, 2:3])
    assert torch.equal(encode(InputEncoder("poisson", MEAN, STD, seed=11), x, 0, 12), whole)
    # a different seed, another step, one pixel changed: different spikes
    assert not torch.equal(encode(InputEncoder("poisson", MEAN, STD, seed=12), x, 0, 12), whole)
    assert not torch.equal(whole[0], whole[1])
    changed = x.clone()
    changed[0, 0, 0, 0] += 0.01
    spikes = encode(encoder, changed, 0, 12)
    assert torch.equal(spikes[:, 1:], whole[:, 1:])
    assert not torch.equal(spikes[:, 0, 1:], whole[:, 0, 1:])  # a new image key: the other pixels change too
    # identical images at different positions in the batch get identical spikes
    twins = torch.cat([x[:1], x[:1]])
    spikes = encode(encoder, twins, 0, 4)
    assert torch.equal(spikes[:, 0], spikes[:, 1])


def snn_with(encoding: str, seed: int = 0, T: int = 64) -> ann2snn.SpikingNetwork:
    """The network `encoding` feeds, uncalibrated: SNN calibration would fit each network to its own input, and
    the networks would then differ in more than how the input arrives."""
    generator = torch.Generator().manual_seed(4)
    calibration = [normalised(intensities(16, generator)) for _ in range(2)]
    return ann2snn.convert(build(), calibration, qbits=3, T=T, encoding=encoding, encoding_seed=seed,
                           input_mean=MEAN, input_std=STD, snn_calibration="none")


@pytest.mark.parametrize("encoding", ["regular", "poisson"])
def test_results_do_not_depend_on_chunks_or_sub_batches(encoding: str) -> None:
    snn = snn_with(encoding)
    x = normalised(intensities(5, torch.Generator().manual_seed(5)))
    T_list = [6, 16]
    reference = snn.simulate(x, T_list, chunk_size=16)
    for chunk_size, sub_batch in ((1, None), (5, 2), (3, 1)):
        result = snn.simulate(x, T_list, chunk_size=chunk_size, sub_batch=sub_batch)
        for T in T_list:
            assert_rel_close(result.outputs[T], reference.outputs[T], rel=1e-6)
            for name, count in reference.spikes[T].items():
                torch.testing.assert_close(result.spikes[T][name], count, rtol=0, atol=0)
    snn.reset()
    steps = [snn.step(snn.encode_step(x, t)) for t in range(16)]
    start = snn.readout_start(16)
    assert start == 8  # the read-out averages the second half
    assert_rel_close(sum(steps[start:]) / (16 - start), reference.outputs[16], rel=1e-6)


def test_poisson_network_output_depends_on_the_seed() -> None:
    x = normalised(intensities(4, torch.Generator().manual_seed(6)))
    first = snn_with("poisson", seed=1)(x)
    assert torch.equal(snn_with("poisson", seed=1)(x), first)
    assert not torch.equal(snn_with("poisson", seed=2)(x), first)


@pytest.mark.parametrize("encoding, bound", [("regular", 0.01), ("poisson", 0.1)])
def test_encoded_snn_approaches_the_directly_fed_snn(encoding: str, bound: float) -> None:
    """Measured (8 images, relative to the QANN's largest output): regular 0.041 at T=64, 0.0018 at
    T=1024 (error ~ 1/T); Poisson 0.17 and 0.045 (~ 1/sqrt(T))."""
    x = normalised(intensities(8, torch.Generator().manual_seed(7)))
    direct, encoded = snn_with("direct"), snn_with(encoding)
    with torch.no_grad():
        scale = float(direct.qann(x).abs().max())
    T_list = [64, 1024]
    expected, result = direct.simulate(x, T_list), encoded.simulate(x, T_list)
    error = {T: float((result.outputs[T] - expected.outputs[T]).abs().max()) / scale for T in T_list}
    assert error[1024] <= bound
    assert error[1024] < error[64] / 2


def test_the_encoder_follows_the_input_and_the_first_convolution_is_simulated() -> None:
    snn = snn_with("regular")
    assert [node.op for node in snn.prefix.graph.nodes] == ["placeholder", "output"]
    body = list(snn.body.graph.nodes)
    assert body[0].op == "placeholder"
    assert (body[1].op, body[1].target, body[1].args) == ("call_module", "input_encoder", (body[0],))
    assert list(body[0].users) == [body[1]]
    assert (body[2].target, body[2].args) == ("conv1", (body[1],))
    encoder = snn.body.get_submodule("input_encoder")
    assert encoder.mean.tolist() == pytest.approx(MEAN) and encoder.std.tolist() == pytest.approx(STD)
    assert snn.config["encoding"] == "regular"
    direct = snn_with("direct")
    assert "conv1" in dict(direct.prefix.named_modules()) and "conv1" not in dict(direct.body.named_modules())


def test_spike_encodings_need_rate_coding_and_known_names() -> None:
    generator = torch.Generator().manual_seed(8)
    calibration = [normalised(intensities(4, generator))]
    with pytest.raises(ValueError, match=r"'poisson' needs rate-coded neurons.*neuron='signed'.*'direct'"):
        ann2snn.convert(build(), calibration, qbits=2, neuron="signed", encoding="poisson")
    with pytest.raises(ValueError, match=r"unknown encoding 'rate'.*'direct', 'poisson', 'regular'"):
        ann2snn.convert(build(), calibration, qbits=2, encoding="rate")
    with pytest.raises(ValueError, match="positive finite stds"):
        InputEncoder("regular", MEAN, [0.2, 0.0, 0.3])
    with pytest.raises(ValueError, match="seed must be an integer"):
        InputEncoder("poisson", seed=1.5)


def test_cli_regular_encoding_end_to_end(capsys, tmp_path) -> None:
    checkpoint = digits_checkpoint(tmp_path)
    out = tmp_path / "conversion"
    code, stdout, err = run_cli(capsys, *digits_args(checkpoint, "--encoding", "regular", "--out", out))
    assert code == 0, err
    document = json.loads((out / "report.json").read_text())
    assert document["config"]["encoding"] == "regular"
    assert document["config"]["input_mean"] == pytest.approx([0.13])
    assert document["config"]["input_std"] == pytest.approx([0.31])
    assert (out / "snn.onnx").is_file() and (out / "snn-step.onnx").is_file()
    snn = ann2snn.load(out / "snn.pt")
    assert isinstance(snn.body.get_submodule("input_encoder"), InputEncoder)

    code, _, err = run_cli(capsys, "eval", out, "--data", "mnist5k", "--eval-size", 20, "--image-size", "1,28,28",
                           "--T-list", "4", "--no-progress", "--out", tmp_path / "again")
    assert code == 0, err
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["config"]["encoding"] == "regular" and again["accuracy"] == document["accuracy"]

    code, _, err = run_cli(capsys, *digits_args(checkpoint, "--encoding", "poisson", "--neuron", "signed",
                                                "--out", tmp_path / "refused"))
    assert code == 2 and "needs rate-coded neurons" in err and not (tmp_path / "refused").exists()
