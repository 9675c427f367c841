"""`ann2snn convert CHECKPOINT`: convert, evaluate, and write the SNN, its ONNX models and its report."""
from __future__ import annotations

import argparse
from pathlib import Path

from ann2snn.cli import arguments
from ann2snn.cli.arguments import DEFAULT_EVALUATION


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "convert", parents=parents, help="convert a checkpoint and evaluate the SNN",
        description="Convert CHECKPOINT into an SNN; write snn.pt, report.json, report.md and figures to --out.")
    parser.add_argument("checkpoint", type=Path, metavar="CHECKPOINT")
    arguments.add_data_argument(parser, DEFAULT_EVALUATION, "evaluation data")
    # the name convert's evaluation data had before every command called it --data
    parser.add_argument("--eval", dest="data", metavar="DATA", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, metavar="DIR", help="output directory (default <checkpoint stem>-snn)")
    parser.set_defaults(handler=run)


@arguments.data_parallel
def run(args: argparse.Namespace) -> int:
    from ann2snn.distributed import is_main_process
    from ann2snn.evaluation.report import summary
    from ann2snn.workflow import write_conversion

    out = args.out or Path(f"{args.checkpoint.stem}-snn")
    with arguments.output_claim(out, args.force, "convert", args.checkpoint) as claim:
        conversion = arguments.requested_conversion(args, args.checkpoint)
        if not is_main_process():
            return 0
        files = write_conversion(claim, conversion)
    print(summary(conversion.report))
    print(f"\nWrote {out}/: {', '.join(files)}")
    return 0

