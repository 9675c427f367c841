"""An ordered list of named passes; a failure names the pass it happened in."""
from __future__ import annotations

from typing import Any, Callable, Sequence

from ann2snn.errors import ConversionError, InputError

Pass = Callable[[Any], Any]


class Pipeline:
    def __init__(self, passes: Sequence[tuple[str, Pass]]):
        self.passes = list(passes)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.passes]

    def run(self, subject: Any) -> Any:
        for name, run_pass in self.passes:
            try:
                subject = run_pass(subject)
            except InputError:
                raise
            except ConversionError as error:
                raise ConversionError(f"[pass {name}] {error}") from error
            except Exception as error:
                raise ConversionError(f"[pass {name}] failed: {type(error).__name__}: {error}") from error
        return subject
