"""Runs graph passes in order, in the spirit of `torch.fx.passes.infra.pass_manager`.

A pass is a function `GraphModule -> GraphModule` (the first may take an `nn.Module`: `trace`). Passes
only transform; the manager runs the graph checks after each (`graph_utils.finalize`: dead-code
elimination, unused submodules, lint, recompile), records whether each changed the graph, and names the
failing pass in its error."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch.fx as fx

from ann2snn.compiler.graph_utils import finalize
from ann2snn.errors import ConversionError, InputError

Pass = Callable[[Any], fx.GraphModule]


@dataclass(frozen=True)
class PassRecord:
    name: str
    changed: bool  # its code or the type of a module it calls; new weights alone are no change


@dataclass(frozen=True)
class PassResult:
    graph_module: fx.GraphModule
    records: tuple[PassRecord, ...]

    @property
    def changed(self) -> dict[str, bool]:
        return {record.name: record.changed for record in self.records}


def _fingerprint(subject: Any) -> tuple | None:
    if not isinstance(subject, fx.GraphModule):
        return None
    modules = tuple((node.target, type(subject.get_submodule(node.target)))
                    for node in subject.graph.nodes if node.op == "call_module")
    return subject.graph.python_code(root_module="self").src, modules


class PassManager:
    def __init__(self, passes: Sequence[tuple[str, Pass]]):
        self.passes = list(passes)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.passes]

    def __call__(self, subject: Any) -> PassResult:
        records = []
        for name, run_pass in self.passes:
            before = _fingerprint(subject)
            try:
                result = run_pass(subject)
                if not isinstance(result, fx.GraphModule):
                    raise ConversionError(f"returned a {type(result).__name__}, not a GraphModule")
                subject = finalize(result)
            except InputError:
                raise
            except ConversionError as error:
                raise ConversionError(f"[pass {name}] {error}") from error
            except Exception as error:
                raise ConversionError(f"[pass {name}] failed: {type(error).__name__}: {error}") from error
            records.append(PassRecord(name, before is None or _fingerprint(subject) != before))
        return PassResult(subject, tuple(records))

    def run(self, subject: Any) -> fx.GraphModule:
        return self(subject).graph_module


def run_passes(subject: Any, *passes: Pass) -> fx.GraphModule:
    """Run passes outside a pipeline (each named by its function), with the same checks after each."""
    return PassManager([(getattr(run_pass, "func", run_pass).__name__, run_pass) for run_pass in passes]).run(subject)
