"""`ann2snn analyze DIR-or-CHECKPOINT`: each spiking layer against the ANN activation it stands for."""
from __future__ import annotations

import argparse
from pathlib import Path

from ann2snn.cli import arguments
from ann2snn.cli.arguments import DEFAULT_CALIBRATION


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "analyze", parents=parents, help="compare each spiking layer with its ANN activation",
        description="Per layer, on --data: the ANN activation against the SNN's rate x threshold (scatter plots, "
                    "correlation), the relative error at each T, and how much of it comes from clipping, "
                    "quantization and the spiking itself. Writes analysis.json and figures to --out.")
    parser.add_argument("target", type=Path, metavar="DIR-or-CHECKPOINT")
    arguments.add_data_argument(parser, DEFAULT_CALIBRATION, "images to analyse")
    parser.add_argument("--out", type=Path, metavar="DIR",
                        help="output directory (default: beside the conversion analysed, CONVERSION-analysis for "
                             "a conversion directory CONVERSION or its snn.pt; <stem>-analysis in the current "
                             "directory for a checkpoint, as convert writes <stem>-snn there)")
    parser.set_defaults(handler=run)


def default_output(target: Path, saved: bool) -> Path:
    """Where the analysis of `target` goes without --out (see the option's help)."""
    from ann2snn.workflow import SNN_FILE

    if not saved:
        return Path(f"{target.stem}-analysis")
    if target.is_dir() or target.name == SNN_FILE:
        conversion = target if target.is_dir() else target.parent
        if conversion.name in ("", ".."):  # '.', '..', or snn.pt in the current directory: the name is needed
            conversion = conversion.resolve()
        return conversion.with_name(f"{conversion.name}-analysis")
    return target.with_name(f"{target.stem}-analysis")


@arguments.data_parallel
def run(args: argparse.Namespace) -> int:
    from ann2snn.distributed import is_main_process
    from ann2snn.evaluation.analysis import analysis_summary, write_analysis
    from ann2snn.workflow import analyze_network, is_saved_conversion, load_conversion

    saved = is_saved_conversion(args.target)
    out = args.out or default_output(args.target, saved)
    with arguments.output_claim(out, args.force, "analyze", args.target) as claim:
        execution = arguments.execution(args)
        data = arguments.data_spec(args.data, DEFAULT_CALIBRATION, "--data")
        if saved:
            arguments.refuse_conversion_options(args, args.target)
            conversion, preprocessing = load_conversion(args.target, device=execution.device,
                                                        preprocessing=arguments.preprocessing_overrides(args))
            snn = conversion.snn
        else:
            snn, _, _, preprocessing = arguments.requested_conversion(args, args.target, evaluate=False)
        analysis = analyze_network(snn, data, preprocessing, size=args.eval_size, T_list=args.T_list,
                                   chunk_size=args.chunk_size, execution=execution)
        if not is_main_process():
            return 0
        files = [path.name for path in write_analysis(analysis, claim.directory)]
        claim.commit()
    print(analysis_summary(analysis))
    print(f"\nWrote {out}/: {', '.join(files)}")
    return 0
