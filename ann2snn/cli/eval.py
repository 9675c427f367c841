"""`ann2snn eval DIR-or-CHECKPOINT`: evaluate a saved conversion, or a checkpoint converted in memory."""
from __future__ import annotations

import argparse
from pathlib import Path

from ann2snn.cli import arguments
from ann2snn.cli.arguments import DEFAULT_EVALUATION


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "eval", parents=parents, help="evaluate an existing conversion",
        description="Evaluate a conversion directory or snn.pt file (or convert CHECKPOINT in memory first).")
    parser.add_argument("target", type=Path, metavar="DIR-or-CHECKPOINT")
    arguments.add_data_argument(parser, DEFAULT_EVALUATION, "evaluation data")
    parser.add_argument("--out", type=Path, metavar="DIR", help="also write the report files to DIR")
    parser.set_defaults(handler=run)


@arguments.data_parallel
def run(args: argparse.Namespace) -> int:
    from ann2snn.distributed import is_main_process
    from ann2snn.evaluation.report import summary, write_report

    with arguments.output_claim(args.out, args.force, "eval", args.target) as claim:
        document = _evaluated(args)
        if not is_main_process():
            return 0
        files: list[str] = []
        if claim is not None:
            files = [path.name for path in write_report(document, claim.directory)]
            claim.commit()
    print(summary(document))
    if args.out is not None:
        print(f"\nWrote {args.out}/: {', '.join(files)}")
    return 0


def _evaluated(args: argparse.Namespace) -> dict:
    """The report document of the target: a saved conversion evaluated, or a checkpoint converted and evaluated."""
    from ann2snn.workflow import evaluate_saved, is_saved_conversion

    if not is_saved_conversion(args.target):
        return arguments.requested_conversion(args, args.target).report
    arguments.refuse_conversion_options(args, args.target)
    return evaluate_saved(args.target, arguments.data_spec(args.data, DEFAULT_EVALUATION, "--data"),
                          eval_size=args.eval_size, T_list=args.T_list, chunk_size=args.chunk_size,
                          preprocessing=arguments.preprocessing_overrides(args), execution=arguments.execution(args))
