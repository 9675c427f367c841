"""How a spiking network carries values in time: one strategy object per coding, consulted wherever the two
codings differ (input frames, bias injection, read-out, quiet detection) instead of branches on a name.

- `RATE`: the input and every bias arrive at every step; a value is the time average of what is sent.
- `ACCUMULATE`: the input and every bias arrive once, at step 0; a value is the sum over time (signed
  neurons, which settle on the QANN's levels)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Coding:
    name: str
    # whether static inputs (the image, biases, constant currents) are given at step 0 only
    inject_once: bool

    def frame(self, value: torch.Tensor, t: int) -> torch.Tensor:
        """What a static input `value` contributes at global step t."""
        return value if not self.inject_once or t == 0 else torch.zeros_like(value)

    def read_out(self, total: torch.Tensor, steps: int) -> torch.Tensor:
        """The network's output after `steps` steps whose outputs sum to `total`, comparable to the QANN's."""
        return total.clone() if self.inject_once else total / steps

    def prefix_runs(self, steps: int) -> int:
        """How many times the static prefix's computation is counted in `steps` steps (for operation counts):
        the static input reaches the first layer at every step, or once."""
        return 1 if self.inject_once else steps

    @property
    def settles(self) -> bool:
        """Whether a quiet network's output is final (so simulation can stop when no neuron fires)."""
        return self.inject_once

    def __reduce__(self):
        # saved networks refer to the one instance per name
        return (coding, (self.name,))


RATE = Coding("rate", inject_once=False)
ACCUMULATE = Coding("accumulate", inject_once=True)
CODINGS: dict[str, Coding] = {coding_.name: coding_ for coding_ in (RATE, ACCUMULATE)}


def coding(name: str | Coding) -> Coding:
    """The coding called `name` (a Coding is returned as it is)."""
    if isinstance(name, Coding):
        return name
    try:
        return CODINGS[name]
    except KeyError:
        raise ValueError(f"coding must be one of {tuple(CODINGS)}, got {name!r}") from None
