"""The names and defaults the command line's options offer (neuron kinds, threshold rules, encodings, the
configuration's defaults, ...), read without importing the library: the registries and the configuration that
define them import torch, which takes seconds and most of a gigabyte, and `ann2snn --help` must not wait for it.

Each value is read from its module's source, where it is a literal (a tuple, a dict's keys, a dataclass field's
default, a registry entry's name, or a name bound to one, here or in a module it is imported from). Where it is
not, the module is imported after all, so that a value is never wrong, only slow; the tests check every value
against the imported one."""
from __future__ import annotations

import ast
import datetime
import functools
import importlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PACKAGE = "ann2snn"
_ROOT = Path(__file__).resolve().parents[1]


class _NotLiteral(Exception):
    """The source does not state the value as a literal."""


@functools.cache
def _definitions(module: str) -> tuple[dict[str, ast.expr], dict[str, str]]:
    """A module's top-level and class-level bindings (`name` or `Class.name` -> the expression bound) and the
    names it imports from other ann2snn modules (name -> module)."""
    path = _ROOT.joinpath(*module.split(".")[1:]).with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    bound: dict[str, ast.expr] = {}
    imported: dict[str, str] = {}

    def bind(statements: list[ast.stmt], prefix: str) -> None:
        for statement in statements:
            if isinstance(statement, ast.Assign) and len(statement.targets) == 1 \
                    and isinstance(statement.targets[0], ast.Name):
                bound[prefix + statement.targets[0].id] = statement.value
            elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name) \
                    and statement.value is not None:
                bound[prefix + statement.target.id] = statement.value
            elif isinstance(statement, ast.ClassDef) and not prefix:
                bind(statement.body, f"{statement.name}.")
            elif isinstance(statement, ast.ImportFrom) and not prefix and (statement.module or "").startswith(
                    _PACKAGE):
                imported.update({alias.asname or alias.name: statement.module for alias in statement.names})

    bind(tree.body, "")
    return bound, imported


def _evaluate(module: str, node: ast.expr) -> Any:
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Tuple | ast.List):
        return tuple(_evaluate(module, element) for element in node.elts)
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {_evaluate(module, key): _evaluate(module, value) for key, value in zip(node.keys, node.values)}
    if isinstance(node, ast.Name):
        return _resolve(module, node.id)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "timedelta" \
            and not node.args:
        return datetime.timedelta(**{keyword.arg: _evaluate(module, keyword.value) for keyword in node.keywords})
    raise _NotLiteral(ast.dump(node))


def _resolve(module: str, name: str) -> Any:
    bound, imported = _definitions(module)
    if name in bound:
        return _evaluate(module, bound[name])
    if name in imported:
        return _resolve(imported[name], name)
    raise _NotLiteral(f"{module}.{name}")


def _keys(module: str, name: str) -> tuple[Any, ...]:
    """The keys of the dict literal bound to `name` (its values may be anything: functions, classes)."""
    node = _definitions(module)[0].get(name)
    if not isinstance(node, ast.Dict) or None in node.keys:
        raise _NotLiteral(f"{module}.{name}")
    return tuple(_evaluate(module, key) for key in node.keys)


def _entries(module: str, name: str, entry: str, *positions: int) -> dict[Any, tuple[Any, ...]]:
    """A registry built from `entry(...)` calls: the first argument of each call (its name) -> its arguments at
    `positions`."""
    node = _definitions(module)[0].get(name)
    calls = [call for call in ast.walk(node) if isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
             and call.func.id == entry] if node is not None else []
    if not calls:
        raise _NotLiteral(f"{module}.{name}")
    return {_evaluate(module, call.args[0]): tuple(_evaluate(module, call.args[position]) for position in positions)
            for call in calls}


def _read(source: Callable[[], Any], imported: Callable[[], Any]) -> Any:
    try:
        return source()
    except (_NotLiteral, OSError, SyntaxError, IndexError):
        return imported()


def _library(module: str) -> Any:
    return importlib.import_module(module)


def config_default(part: str, field: str) -> Any:
    """The default of a field of one of `ann2snn.config`'s dataclasses (`config_default("SimulationConfig", "T")`)."""
    return _read(lambda: _resolve("ann2snn.config", f"{part}.{field}"),
                 lambda: getattr(getattr(_library("ann2snn.config"), part), field))


_NEURON_KINDS = "ann2snn.runtime.neuron_kinds"
# NeuronKind(name, coding, build, spike_value, options, description): the name and the options' defaults
_NEURON_OPTIONS = 4
NEURON_KINDS: tuple[str, ...] = _read(lambda: tuple(_entries(_NEURON_KINDS, "NEURON_KINDS", "NeuronKind")),
                                      lambda: tuple(_library(_NEURON_KINDS).NEURON_KINDS))
ADAPTIVE = "adaptive"
ADAPTIVE_OPTIONS: dict[str, float] = _read(
    lambda: _entries(_NEURON_KINDS, "NEURON_KINDS", "NeuronKind", _NEURON_OPTIONS)[ADAPTIVE][0],
    lambda: dict(_library(_NEURON_KINDS).NEURON_KINDS[ADAPTIVE].options))
THRESHOLD_RULES: tuple[str, ...] = _read(lambda: _keys("ann2snn.compiler.observers", "THRESHOLD_RULES"),
                                         lambda: tuple(_library("ann2snn.compiler.observers").THRESHOLD_RULES))
ENCODINGS: tuple[str, ...] = _read(lambda: _resolve("ann2snn.runtime.encoding", "ENCODINGS"),
                                   lambda: tuple(_library("ann2snn.runtime.encoding").ENCODINGS))
PRUNE_MODES: tuple[str, ...] = _read(lambda: _resolve("ann2snn.training.pruning", "PRUNE_MODES"),
                                     lambda: tuple(_library("ann2snn.training.pruning").PRUNE_MODES))
ONNX_FORMATS: tuple[str, ...] = _read(lambda: _resolve("ann2snn.interop.onnx", "FORMATS"),
                                      lambda: tuple(_library("ann2snn.interop.onnx").FORMATS))
ONNX_FILE_NAMES: dict[str, str] = _read(lambda: _resolve("ann2snn.interop.onnx", "FILE_NAMES"),
                                        lambda: dict(_library("ann2snn.interop.onnx").FILE_NAMES))
NIR_FILE_NAME: str = _read(lambda: _resolve("ann2snn.interop.nir", "FILE_NAME"),
                          lambda: _library("ann2snn.interop.nir").FILE_NAME)
DEFAULT_DIST_TIMEOUT: datetime.timedelta = _read(lambda: _resolve("ann2snn.distributed", "DEFAULT_TIMEOUT"),
                                                 lambda: _library("ann2snn.distributed").DEFAULT_TIMEOUT)
THRESHOLD_LEVELS: tuple[str, ...] = _read(lambda: _resolve("ann2snn.config", "THRESHOLD_LEVELS"),
                                          lambda: tuple(_library("ann2snn.config").THRESHOLD_LEVELS))
_SPIKING = "ann2snn.compiler.passes.calibrate_spiking"
SPIKING_CALIBRATIONS: tuple[str, ...] = _read(lambda: _keys(_SPIKING, "SPIKING_CALIBRATIONS"),
                                              lambda: tuple(_library(_SPIKING).SPIKING_CALIBRATIONS))
_RECONSTRUCTION = "ann2snn.compiler.passes.reconstruct_blocks"
RECONSTRUCTIONS: tuple[str, ...] = _read(lambda: _keys(_RECONSTRUCTION, "RECONSTRUCTIONS"),
                                         lambda: tuple(_library(_RECONSTRUCTION).RECONSTRUCTIONS))
_ENERGY = "ann2snn.evaluation.energy"
ENERGY_PRESETS: tuple[str, ...] = _read(lambda: _keys(_ENERGY, "ENERGY_PRESETS"),
                                        lambda: tuple(_library(_ENERGY).ENERGY_PRESETS))
DEFAULT_ENERGY_PRESET: str = _read(lambda: _resolve(_ENERGY, "DEFAULT_ENERGY_PRESET"),
                                   lambda: _library(_ENERGY).DEFAULT_ENERGY_PRESET)
