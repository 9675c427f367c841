"""Errors raised by the compiler, and how they describe the graph nodes they are about."""
from __future__ import annotations

import os
import re

import torch
import torch.fx as fx

# frames of torch and of this library's own machinery are never the user's line; the zoo's models are
# (a separator ends each prefix: torchvision's files are not torch's)
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_LIBRARY_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
_ZOO_DIR = os.path.join(_LIBRARY_DIR, "zoo") + os.sep
_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)\n\s*(?P<code>[^\n]*)')


class ConversionError(RuntimeError):
    """The model cannot be converted as it is; the message says which node(s) and what to change."""


class InputError(ValueError):
    """The data given to the compiler cannot be used as it is (batch form, dtype, size, NaN, labels). Passes let
    it through unwrapped: it is about the data, not a failure of the pass that happened to read it."""


class ConversionWarning(UserWarning):
    """Something the conversion changed or assumed that the user should know about (the command line
    prints these as `ann2snn: warning: ...`)."""


def innermost_user_frame(frames: list[tuple[str, int, str]]) -> str:
    """The innermost (file, line, code) frame outside torch and this library, as 'file:line (code)'."""
    user = [frame for frame in frames
            if not frame[0].startswith((_TORCH_DIR, _LIBRARY_DIR)) or frame[0].startswith(_ZOO_DIR)]
    if not user:
        return "source line unknown"
    file, line, code = user[-1]
    return f"{file}:{line} ({code.strip()})"


def user_frame(stack_trace: str | None) -> str:
    """The user's source line in an FX node's recorded stack trace."""
    frames = [(m["file"], int(m["line"]), m["code"]) for m in _FRAME.finditer(stack_trace or "")]
    return innermost_user_frame(frames)


def target_name(gm: fx.GraphModule, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.target} ({type(gm.get_submodule(node.target)).__name__})"
    if node.op == "call_function":
        module = getattr(node.target, "__module__", None) or ""
        name = getattr(node.target, "__qualname__", None) or getattr(node.target, "__name__", repr(node.target))
        return f"{module}.{name}" if module else name
    return str(node.target)


def describe_node(gm: fx.GraphModule, node: fx.Node) -> str:
    """One line naming an FX node: its name, op, target (with module type) and the user's source line."""
    owner = node.meta.get("module_path")
    inside = f" inside '{owner}'" if owner else ""
    return f"node '{node.name}' [{node.op} {target_name(gm, node)}]{inside} at {user_frame(node.stack_trace)}"
