"""Input encodings: how the image reaches the first layer of a spiking network.

- `direct`: the analog image itself, at every step (rate coding) or once (accumulate coding); the first
  layer(s) are then computed once per batch (see `ann2snn.runtime.network.split_static_prefix`).
- `poisson`: at every step each pixel spikes with probability equal to its intensity.
- `regular`: each pixel spikes at the regular rate of its intensity (an IF neuron on the intensity).

With a spike encoding an `InputEncoder` follows the graph's input (pass `insert_encoder`). The network still takes the
normalised image x; the encoder recovers the intensity p = clamp(x * std + mean, 0, 1), emits binary
spikes s_t of rate p and passes on (s_t - mean) / std, whose time average tends to x. Being a temporal
module, it moves the first layer into the time-dependent body.

Poisson spikes are a pure function of (seed, image, step, pixel): a counter-based hash, not a random
generator's stream, so that they do not depend on how the batch is split into sub-batches, time chunks or
processes. Everything is integer arithmetic on int64 tensors kept below 2**49, so it is the same on every
device and exports to ONNX's integer operators."""
from __future__ import annotations

import torch

from ann2snn.runtime.coding import Coding, Step
from ann2snn.runtime.coding import coding as coding_named
from ann2snn.runtime.layers import TemporalModule, channel_shaped

ENCODINGS = ("direct", "poisson", "regular")
SPIKE_ENCODINGS = ("poisson", "regular")

_MASK32 = 0xFFFFFFFF
# The intensity is read to 24 bits (a float32 significand) for the image's key.
_INTENSITY_LEVELS = 1 << 24


def check_encoding(encoding: str, coding: Coding | str | None = None, neuron: str | None = None) -> None:
    """Refuse an unknown encoding, or a spike encoding for a network whose input arrives once."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {ENCODINGS}")
    if encoding in SPIKE_ENCODINGS and coding is not None and coding_named(coding).inject_once:
        raise ValueError(f"encoding {encoding!r} needs rate-coded neurons, but neuron={neuron!r} uses accumulate "
                         "coding (the input is injected once, at step 0, so there is no spike train to encode); "
                         "use encoding='direct' with it, or neuron='signed-rate' (or 'if', 'lif', 'adaptive') "
                         f"with {encoding!r}")


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """x * constant mod 2**32 for x < 2**32, in halves of the constant: the full product would overflow int64."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """The lowbias32 integer hash (Chris Wellons): a bijection of [0, 2**32) with good avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def poisson_uniforms(intensity: torch.Tensor, t: torch.Tensor, seed: int) -> torch.Tensor:
    """Uniform numbers in [0, 1), one per element of `intensity` [rows, ...], each a hash of the seed, the
    row's step `t` [rows], the element's position within its sample and a key of the sample's values."""
    per_sample = intensity[0].numel()
    position = mix32(torch.arange(per_sample, device=intensity.device, dtype=torch.int64))
    levels = torch.round(intensity.flatten(1) * _INTENSITY_LEVELS).to(torch.int64)
    image_key = mix32(levels ^ position).sum(1) & _MASK32  # integer sum: the same in any order
    row_key = mix32(mix32(image_key ^ (seed & _MASK32)) ^ (t.to(torch.int64) & _MASK32))
    element = mix32((mix32(position ^ row_key.unsqueeze(1)) + row_key.unsqueeze(1)) & _MASK32)
    return (element.to(torch.float64) / 2.0 ** 32).to(intensity.dtype).reshape(intensity.shape)


def regular_spikes(intensity: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A spike at step t iff floor((t + 1) p + 1/2) > floor(t p + 1/2): the IF neuron with threshold 1 and
    membrane starting at 1/2 driven by p, stateless, so any step can be computed on its own."""
    steps = t.to(intensity.dtype).reshape((-1,) + (1,) * (intensity.ndim - 1))
    return (torch.floor((steps + 1) * intensity + 0.5) > torch.floor(steps * intensity + 0.5)).to(intensity.dtype)


class InputEncoder(TemporalModule):
    """Turns the normalised image x into binary spikes of rate p = clamp(x * std + mean, 0, 1) and passes
    on (spikes - mean) / std. `mean` and `std` are the per-channel normalisation of the input (defaults 0
    and 1: the input is the intensity itself)."""

    def __init__(self, encoding: str, mean=None, std=None, seed: int = 0):
        super().__init__()
        if encoding not in SPIKE_ENCODINGS:
            raise ValueError(f"InputEncoder encodes spikes: encoding must be one of {SPIKE_ENCODINGS}, "
                             f"got {encoding!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"encoding seed must be an integer, got {seed!r}")
        mean = torch.as_tensor(0.0 if mean is None else mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(1.0 if std is None else std, dtype=torch.float32).flatten()
        if not bool(torch.isfinite(mean).all()) or not bool((std > 0).all()) or not bool(torch.isfinite(std).all()):
            raise ValueError(f"input normalisation needs finite means and positive finite stds, got mean "
                             f"{mean.tolist()} and std {std.tolist()}")
        self.encoding = encoding
        self.seed = seed
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def encode(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the first layer receives for the normalised images x [rows, C, ...] at steps t [rows]."""
        mean, std = channel_shaped(self.mean, x.ndim).to(x.dtype), channel_shaped(self.std, x.ndim).to(x.dtype)
        intensity = torch.clamp(x * std + mean, 0.0, 1.0)
        if self.encoding == "regular":
            spikes = regular_spikes(intensity, t)
        else:
            spikes = (poisson_uniforms(intensity, t, self.seed) < intensity).to(x.dtype)
        return (spikes - mean) / std

    def single_step_forward(self, x: torch.Tensor, t: Step) -> torch.Tensor:
        return self.encode(x, torch.as_tensor(t, device=x.device).expand(x.shape[0]))

    def multi_step_forward(self, x_seq: torch.Tensor, t0: int) -> torch.Tensor:
        # The declared step for a whole window: `encode` treats each row at its own step, so one call.
        steps, rows_per_step = x_seq.shape[:2]
        t = torch.arange(t0, t0 + steps, device=x_seq.device).repeat_interleave(rows_per_step)
        return self.encode(x_seq.flatten(0, 1), t).unflatten(0, (steps, rows_per_step))

    def extra_repr(self) -> str:
        return f"encoding={self.encoding}, seed={self.seed}, mean={self.mean.tolist()}, std={self.std.tolist()}"

