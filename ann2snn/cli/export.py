"""`ann2snn export DIR-or-FILE`: ONNX models, or a NIR graph, of a saved conversion."""
from __future__ import annotations

import argparse
from pathlib import Path

from ann2snn.cli import arguments
from ann2snn.cli.arguments import PROGRAM, UsageError
from ann2snn.cli.vocabulary import NIR_FILE_NAME, ONNX_FILE_NAMES, ONNX_FORMATS

NIR = "nir"


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="write ONNX models or a NIR graph of a conversion",
        description="Write ONNX models of the conversion in DIR (or of an snn.pt file) beside it: "
                    + ", ".join(f"{name} ({f})" for f, name in ONNX_FILE_NAMES.items())
                    + f"; or, with --format {NIR}, its NIR graph ({NIR_FILE_NAME}).")
    parser.add_argument("target", type=Path, metavar="DIR-or-FILE")
    parser.add_argument("--format", choices=(*ONNX_FORMATS, "all", NIR), default="all",
                        help="single-step: one step, state in and out; t-step: the whole simulation in a Loop; "
                             "qann: the quantized ANN; all: the three ONNX models (default); nir: the spiking "
                             "network as a NIR graph (the Neuromorphic Intermediate Representation, for neuromorphic "
                             "toolchains and other simulators)")
    parser.add_argument("--T", type=arguments.positive_int,
                        help="time steps of the t-step model, or the T a NIR file states (default: the network's T)")
    parser.add_argument("--image-size", nargs="+", metavar="N",
                        help="model input size C,H,W (default: from the conversion's metadata)")
    parser.add_argument("--out", type=Path, metavar="DIR", help="write the files to DIR (default: beside snn.pt)")
    parser.add_argument("--force", action="store_true",
                        help="replace ONNX or NIR files that ann2snn wrote before (the .ann2snn-output marker of their "
                             "directory lists them; convert writes snn.onnx and snn-step.onnx); other files are "
                             "never replaced")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ann2snn.interop.nir import export_nir
    from ann2snn.interop.onnx import FILE_NAMES, FORMATS, write_onnx_files
    from ann2snn.io.output_directory import OutputRefused, check_files_replaceable, record_files
    from ann2snn.io.saved_network import load_saved
    from ann2snn.workflow import saved_network_file

    saved_file = saved_network_file(args.target)
    out = args.out or saved_file.parent
    formats = FORMATS if args.format == "all" else (args.format,)
    names = [NIR_FILE_NAME] if args.format == NIR else [FILE_NAMES[f] for f in formats]
    try:
        check_files_replaceable(out, names, args.force)
    except OutputRefused as error:
        raise UsageError(str(error)) from error
    saved = load_saved(saved_file)
    image_size = arguments.numbers(args.image_size, int) or saved.metadata.get("preprocessing", {}).get("image_size")
    if not image_size:
        raise UsageError(f"{saved_file} records no input size; pass --image-size C,H,W")
    out.mkdir(parents=True, exist_ok=True)
    if args.format == NIR:
        written = [export_nir(saved.snn, out / NIR_FILE_NAME, tuple(image_size), T=args.T)]
    else:
        written = write_onnx_files(saved.snn, out, formats, input_shape=tuple(image_size), T=args.T)
    record_files(out, [path.name for path in written], f"{PROGRAM} export")
    for path in written:
        print(f"Wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")
    return 0
