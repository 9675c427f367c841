"""The `ann2snn` command line: convert, eval, inspect, export and analyze, one module each over
`ann2snn.workflow`; argument definitions shared in `ann2snn.cli.arguments`.

    ann2snn convert CHECKPOINT --T 32 --qbits 4 [--calib DATA] [--data DATA] [--T-list 8,16,32,64] ...
    ann2snn eval DIR-or-FILE --data DATA [--T-list ...] [--out DIR]
    ann2snn inspect CHECKPOINT
    ann2snn export DIR-or-FILE [--format single-step|t-step|qann|all] [--T N] [--out DIR]
    ann2snn analyze DIR-or-CHECKPOINT [--data DATA] [--out DIR]
    ann2snn baseline record CHECKPOINT... --out FILE [conversion options]
    ann2snn baseline check FILE | update FILE

Exit codes: 0 on success, 1 when the work fails (unconvertible model, unreadable checkpoint, missing
data, a regression found by `baseline check`, ...), 2 for usage errors;
errors are printed as one line `ann2snn: error: <reason>`."""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ann2snn import __version__
from ann2snn.cli import analyze, arguments, baseline, convert, eval, export, inspect
from ann2snn.cli.arguments import PROGRAM, Parser, UsageError

# Nothing imported here imports torch: `--help` and `--version` answer at once; the commands import the library
# when they run.


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog=PROGRAM, description="Compile trained PyTorch ANNs into spiking neural networks, and "
                                              "measure them.")
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model = arguments.model_arguments()
    converting = [model, arguments.conversion_arguments(), arguments.run_arguments()]
    convert.add_parser(commands, converting)
    eval.add_parser(commands, converting)
    inspect.add_parser(commands, [model])
    export.add_parser(commands)
    analyze.add_parser(commands, converting)
    baseline.add_parser(commands, converting)
    return parser


def _one_line(error: BaseException) -> str:
    message = " ".join(str(error).split()) or type(error).__name__
    from ann2snn.distributed import is_distributed, rank, world_size
    from ann2snn.errors import ConversionError

    if isinstance(error, ConversionError):
        message += f" (`{PROGRAM} inspect CHECKPOINT` lists every node and what it becomes)"
    elif not isinstance(error, (ValueError, OSError, UsageError)):
        message = f"{type(error).__name__}: {message}"
    if is_distributed():
        message = f"process {rank()} of {world_size()}: {message}"
    return message


class _LineTrackingStream:
    """A text stream that remembers whether what was written to it last ended a line: a progress bar leaves
    the cursor on its own line (tqdm even when it clears itself), and an error or a warning printed after it
    must start a line of its own, so that `grep '^ann2snn: error'` finds it in a log."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.at_line_start = True

    def write(self, text: str) -> int:
        if text:
            self.at_line_start = text.endswith("\n")
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


@contextmanager
def _tracked_stderr() -> Iterator[_LineTrackingStream]:
    tracked = _LineTrackingStream(sys.stderr)
    sys.stderr = tracked
    try:
        yield tracked
    finally:
        sys.stderr = tracked.stream


def _print_line(text: str) -> None:
    """`text` as a line of its own on stderr, after whatever a progress bar left on the current one."""
    if not getattr(sys.stderr, "at_line_start", True):
        text = "\n" + text
    print(text, file=sys.stderr)


@contextmanager
def _warnings_as_lines() -> Iterator[None]:
    """The library's ConversionWarnings printed like errors: one line, `ann2snn: warning: <what>`."""
    from ann2snn.errors import ConversionWarning

    with warnings.catch_warnings():
        show_other = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None) -> None:
            if issubclass(category, ConversionWarning):
                _print_line(f"{PROGRAM}: warning: {' '.join(str(message).split())}")
            else:
                show_other(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


@contextmanager
def _terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, batch schedulers, torchrun stopping a job) ends the run like Ctrl-C does: the
    staged outputs are removed and a previous output directory stays as it was."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (0 success, 1 failure, 2 usage error)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_request:
        # argparse exits after --help (0) and on usage errors (2), having printed why.
        return int(exit_request.code or 0)
    with _tracked_stderr():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        with _warnings_as_lines(), _terminate_as_interrupt():
            return args.handler(args)
    except UsageError as error:
        _print_line(f"{PROGRAM}: error: {_one_line(error)}")
        return 2
    except KeyboardInterrupt:
        _print_line(f"{PROGRAM}: interrupted")
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`ann2snn inspect ... | head`): stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:  # every failure becomes one line and exit code 1, as the docstring promises
        _print_line(f"{PROGRAM}: error: {_one_line(error)}")
        return 1
