"""What each technique of the default 0/1-spike recipe adds: accuracy at each T of a network converted for
that T (the SNN calibration and the T-level thresholds are fitted to the T they run), test-1000, calibrated
on train-calib-512, with the QANN each conversion makes, the conversion time and 95 % intervals.

    python tools/ablation.py [--model CHECKPOINT] [--T-list 8,16,32,64] [--rows NAME,...] [--eval-size N]
                             [--base JSON]

Rows add the techniques one by one, from the plain conversion to the default recipe, then leave each out
of the default. Every row is a conversion record (`ann2snn.config.ConversionConfig.from_dict`) over the
given model's defaults and `--base` (a fine-tuned checkpoint keeps its thresholds, and the threshold rows do
not apply to it, unless --base says {"recalibrate": true}). Prints a markdown table; the default model is
the shared ResNet-20 (no fine-tuning)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared_subsets import calibration_inputs, test_batches  # noqa: E402

import ann2snn  # noqa: E402
from ann2snn.config import ConversionConfig  # noqa: E402
from ann2snn.evaluation.statistics import accuracy_interval  # noqa: E402
from ann2snn.io.data import shared_dir  # noqa: E402
from ann2snn.io.model_loading import load_model  # noqa: E402

PLAIN = {"threshold_levels": "bits", "snn_calibration": "none", "readout_delay": 0.0, "per_channel": False}
CUMULATIVE = {
    "plain": PLAIN,
    "+ T-level thresholds": {**PLAIN, "threshold_levels": "steps"},
    "+ bias calibration": {**PLAIN, "threshold_levels": "steps", "snn_calibration": "bias"},
    "+ read-out delay T/2": {**PLAIN, "threshold_levels": "steps", "snn_calibration": "bias", "readout_delay": 0.5},
    "+ per-channel thresholds": {"snn_calibration": "bias"},
    "+ weight calibration before the bias (default)": {},
}
LEAVE_ONE_OUT = {
    "default without T-level thresholds": {"threshold_levels": "bits"},
    "default without SNN calibration": {"snn_calibration": "none"},
    "default without read-out delay": {"readout_delay": 0.0},
    "default without per-channel thresholds": {"per_channel": False},
}
ROWS = {**CUMULATIVE, **LEAVE_ONE_OUT}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="checkpoint (default: the shared resnet20-cifar10.th)")
    parser.add_argument("--arch", help="architecture, where the file name does not say it")
    parser.add_argument("--T-list", default="8,16,32,64")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"names of: {'; '.join(ROWS)}")
    parser.add_argument("--eval-size", type=int, help="a stratified subset of test-1000")
    parser.add_argument("--base", type=json.loads, default={},
                        help='settings under every row, e.g. \'{"snn_calibration_images": 64}\'; "recalibrate": '
                             'true calibrates new thresholds for a fine-tuned checkpoint')
    args = parser.parse_args()
    rows = [name.strip() for name in args.rows.split(",") if name.strip()]
    if unknown := [name for name in rows if name not in ROWS]:
        parser.error(f"unknown row {', '.join(unknown)}; the rows are {'; '.join(ROWS)}")
    T_list = [int(T) for T in args.T_list.split(",")]
    torch.set_num_threads(1)

    model_file = args.model or shared_dir() / "models" / "resnet20-cifar10.th"
    loaded = load_model(model_file, arch=args.arch)
    calibration = calibration_inputs(loaded.preprocessing)
    batches = test_batches(loaded.preprocessing, args.eval_size)
    images = sum(len(y) for _, y in batches)
    base = dict(args.base)
    fine_tuned = loaded.quantization is not None and not base.pop("recalibrate", False)
    thresholds = loaded.quantization["thresholds"] if fine_tuned else None
    base = {**({"qbits": loaded.quantization["qbits"]} if loaded.quantization else {}), **base}

    print(f"model {model_file}, {images} test images, settings {base}, fine-tuned thresholds {fine_tuned}, "
          f"torch {torch.__version__}, ann2snn {ann2snn.__version__}")
    print("| recipe | " + " | ".join(f"T={T}" for T in T_list) + " | QANN at each T | convert s |")
    print("|---|" + "---|" * len(T_list) + "---|---|")
    for name in rows:
        cells, qanns, seconds = [], [], []
        for T in T_list:
            config = ConversionConfig.from_dict({**base, **ROWS[name], "T": T})
            start = time.perf_counter()
            snn = ann2snn.convert(loaded.model, calibration, config, thresholds=thresholds)
            seconds.append(time.perf_counter() - start)
            report = ann2snn.evaluate(snn, batches, [T])
            low, high = accuracy_interval(report.accuracy_snn[T], images)
            cells.append(f"{100 * report.accuracy_snn[T]:.1f} ({100 * low:.1f}-{100 * high:.1f})")
            qanns.append(f"{100 * report.accuracy_qann:.1f}")
        print(f"| {name} | " + " | ".join(cells) + f" | {' / '.join(qanns)} | "
              f"{' / '.join(f'{s:.0f}' for s in seconds)} |", flush=True)


if __name__ == "__main__":
    main()
