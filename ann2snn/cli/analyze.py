"""`ann2snn analyze DIR-or-CHECKPOINT`: each spiking layer against the ANN activation it stands for."""
from __future__ import annotations

import argparse
from pathlib import Path

from ann2snn.cli import arguments
from ann2snn.cli.arguments import DEFAULT_CALIBRATION
from ann2snn.distributed import is_main_process
from ann2snn.evaluation.analysis import analysis_summary, write_analysis
from ann2snn.workflow import analyze_network, is_saved_conversion, load_conversion, staged_directory


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "analyze", parents=parents, help="compare each spiking layer with its ANN activation",
        description="Per layer, on --data: the ANN activation against the SNN's rate x threshold (scatter plots, "
                    "correlation), the relative error at each T, and how much of it comes from clipping, "
                    "quantization and the spiking itself. Writes analysis.json and figures to --out.")
    parser.add_argument("target", type=Path, metavar="DIR-or-CHECKPOINT")
    arguments.add_data_argument(parser, DEFAULT_CALIBRATION, "images to analyse")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output directory (default <target stem>-analysis)")
    parser.set_defaults(handler=run)


@arguments.data_parallel
def run(args: argparse.Namespace) -> int:
    out = args.out or Path(f"{args.target.stem}-analysis")
    arguments.check_output_free(out, args.force)
    execution = arguments.execution(args)
    data = arguments.data_spec(args.data, DEFAULT_CALIBRATION, "--data")
    if is_saved_conversion(args.target):
        arguments.refuse_conversion_options(args, args.target)
        saved, preprocessing = load_conversion(args.target, preprocessing=arguments.preprocessing_overrides(args),
                                               device=execution.device)
        snn = saved.snn
    else:
        snn, _, _, preprocessing = arguments.requested_conversion(args, args.target, evaluate=False)
    analysis = analyze_network(snn, data, preprocessing, size=args.eval_size, T_list=args.T_list,
                               chunk_size=args.chunk_size, execution=execution)
    if not is_main_process():
        return 0
    with staged_directory(out) as staging:
        files = [path.name for path in write_analysis(analysis, staging)]
    print(analysis_summary(analysis))
    print(f"\nWrote {out}/: {', '.join(files)}")
    return 0
