"""How a spiking network carries values in time: one strategy object per coding, consulted wherever the two
codings differ (input frames, bias injection, read-out, operation counts, quiet detection) instead of
branches on a name.

- `RATE`: the input and every bias arrive at every step; a value is the time average of what is sent.
- `ACCUMULATE`: the input and every bias arrive once, at step 0; a value is the sum over time (signed
  neurons, which settle on the QANN's levels).

A network's `coding` attribute compares equal to its name ("rate", "accumulate"), which is what it held
before these objects existed, so code comparing it with a string keeps working; reports and saved files
record the name."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# A global time step: a Python int when simulating, an int64 0-d tensor in traced steps (ONNX export).
Step = int | torch.Tensor


@dataclass(frozen=True, eq=False)
class Coding:
    name: str
    # whether static inputs (the image, biases, constant currents) are given at step 0 only
    inject_once: bool
    # what `read_out` makes of the steps' outputs, in words (reports, ONNX model docs)
    output_meaning: str

    def injects_at(self, t: Step) -> bool | torch.Tensor:
        """Whether a static input reaches the network at global step t (a bool tensor for a tensor t)."""
        return t == 0 if self.inject_once else True

    def frame(self, value: torch.Tensor, t: Step) -> torch.Tensor:
        """What a static input `value` contributes at global step t: the one definition of "given at every
        step" and "given at step 0 only", used for the input frames, bias injection and the ONNX models."""
        injected = self.injects_at(t)
        if isinstance(injected, torch.Tensor):
            return torch.where(injected, value, torch.zeros_like(value))
        return value if injected else torch.zeros_like(value)

    def frames(self, value: torch.Tensor, t0: int, steps: int) -> torch.Tensor:
        """The frames of `value` for global steps t0 .. t0 + steps - 1, time folded into dim 0 (concatenated:
        the frames keep the value's layout, channels-last or not)."""
        return torch.cat([self.frame(value, t) for t in range(t0, t0 + steps)])

    def injected_steps(self, t0: int, steps: int) -> int:
        """How many leading steps of the window t0 .. t0 + steps - 1 receive static inputs (the others receive
        none): what a whole-window computation needs to know of `frame`."""
        return sum(bool(self.injects_at(t)) for t in range(t0, t0 + steps))

    @property
    def averages(self) -> bool:
        """Whether the read-out divides the summed output by the number of steps."""
        return not self.inject_once

    def read_out(self, total: torch.Tensor, steps: int) -> torch.Tensor:
        """The network's output after `steps` steps whose outputs sum to `total`, comparable to the QANN's."""
        return total / steps if self.averages else total.clone()

    def prefix_runs(self, steps: int) -> int:
        """How many times the static prefix's computation is counted in `steps` steps (for operation counts):
        the static input reaches the first layer at every step, or once."""
        return self.injected_steps(0, steps)

    @property
    def settles(self) -> bool:
        """Whether a quiet network's output is final (so simulation can stop when no neuron fires): the
        input stops arriving, so a step without spikes changes nothing after it."""
        return self.inject_once

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Coding | str):
            return self.name == (other.name if isinstance(other, Coding) else other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.name)

    def __str__(self) -> str:
        return self.name

    def __reduce__(self):
        # saved networks refer to the one instance per name
        return (coding, (self.name,))


RATE = Coding("rate", inject_once=False, output_meaning="time average")
ACCUMULATE = Coding("accumulate", inject_once=True, output_meaning="sum over time")
CODINGS: dict[str, Coding] = {coding_.name: coding_ for coding_ in (RATE, ACCUMULATE)}


def coding(name: str | Coding) -> Coding:
    """The coding called `name` (a Coding is returned as it is)."""
    if isinstance(name, Coding):
        return name
    try:
        return CODINGS[name]
    except (KeyError, TypeError):
        raise ValueError(f"coding must be one of {tuple(CODINGS)}, got {name!r}") from None
