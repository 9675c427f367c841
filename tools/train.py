"""Train a zoo model on CIFAR-10, or fine-tune one with QCFS quantizers in place, and write a
self-describing checkpoint that `ann2snn convert` reads directly.

    # an ANN from scratch
    python tools/train.py --arch resnet20 --epochs 30 --lr 0.1 --out models/resnet20.pt
    # 4-bit quantization-aware fine-tuning of it (learned thresholds are stored in the checkpoint)
    python tools/train.py --init models/resnet20.pt --qbits 4 --epochs 4 --lr 0.01 --out models/resnet20-q4.pt

Training state is saved after every epoch beside the output (<out>.state); running the same command
again resumes from it. Data: the shared CIFAR-10 JPEG train split, held in memory as uint8, with random
crop and flip; the accuracy printed per epoch is on the test-1000 subset.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ann2snn.compiler.convert import quantize  # noqa: E402
from ann2snn.io.data import open_dataset, shared_dir  # noqa: E402
from ann2snn.io.model_loading import Preprocessing, load_model, save_checkpoint  # noqa: E402
from ann2snn.training.batches import TensorBatches, decode_images  # noqa: E402
from ann2snn.training.bit_allocation import read_qbits_config  # noqa: E402
from ann2snn.training.finetune import TrainingConfig, accuracy, finetune, train  # noqa: E402
from ann2snn.zoo import build_model  # noqa: E402


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--arch", help="train this zoo architecture from scratch (e.g. resnet20, mobilenet_v2_cifar)")
    source.add_argument("--init", type=Path, help="start from this checkpoint (any form `ann2snn convert` reads)")
    parser.add_argument("--arch-kwargs", type=json.loads, default={},
                        help='constructor arguments as JSON, e.g. \'{"width_mult": 0.5}\'')
    parser.add_argument("--qbits", type=int,
                        help="fine-tune with QCFS quantizers of this many bits (default: plain ANN)")
    parser.add_argument("--qbits-config", type=Path, metavar="FILE",
                        help='with --qbits: JSON mapping of activation names, "first" and "last" to their own bits '
                             "(`ann2snn analyze` lists the names); --qbits gives the others")
    parser.add_argument("--per-channel", action="store_true", help="one learnable threshold per channel")
    parser.add_argument("--quantize-streams", action="store_true",
                        help="with --qbits: also quantize, symmetrically, the linear values convolutions read "
                             "(MobileNetV2's bottleneck outputs and residual stream); convert with signed neurons")
    parser.add_argument("--epochs", type=int, required=True)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--warmup-epochs", type=float, default=0.0)
    parser.add_argument("--label-smoothing", type=float, default=0.0)
    parser.add_argument("--spike-penalty", type=float, default=0.0, metavar="LAMBDA",
                        help="with --qbits: add LAMBDA x the SNN's spikes per neuron and image to the loss "
                             "(default 0: none)")
    parser.add_argument("--synops-penalty", type=float, default=0.0, metavar="LAMBDA",
                        help="with --qbits: add LAMBDA x the SNN's synaptic operations per image over the ANN's "
                             "MACs to the loss, each spike weighted by the synapses it drives (default 0: none)")
    parser.add_argument("--cutout", type=int, default=0, metavar="PIXELS",
                        help="cut out one square of this size per training image (default 0: none)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", help="training data (default <shared>/data/cifar10/train)")
    parser.add_argument("--eval",
                        help="accuracy printed per epoch (default <shared>/data/cifar10/subsets/test-1000.txt)")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint to write")
    parser.add_argument("--half", action="store_true", help="store floating-point weights as float16 (smaller files)")
    parser.add_argument("--trust-pickle", action="store_true", help="allow a pickled --init checkpoint")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.qbits_config is not None:
        if args.qbits is None:
            parser.error("--qbits-config needs --qbits: the bits of the activations it does not name")
        try:
            args.bits = {**read_qbits_config(args.qbits_config), "default": args.qbits}
        except (OSError, ValueError) as error:
            parser.error(f"--qbits-config: {error}")
    else:
        args.bits = args.qbits
    if args.quantize_streams and args.qbits is None:
        parser.error("--quantize-streams needs --qbits: it adds quantizers to the quantization-aware network")
    for option in ("spike_penalty", "synops_penalty"):
        if getattr(args, option) and args.qbits is None:
            parser.error(f"--{option.replace('_', '-')} needs --qbits: it penalises the spikes of the quantized "
                         f"network's SNN")
    # Bad settings are refused here, not after the minute the training data takes to decode
    try:
        args.config = TrainingConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay,
                                     warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
                                     spike_penalty=args.spike_penalty, synops_penalty=args.synops_penalty)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.init is not None:
        loaded = load_model(args.init, trust_pickle=args.trust_pickle)
        model, arch, arch_kwargs, preprocessing = loaded.model, loaded.arch, loaded.arch_kwargs, loaded.preprocessing
    else:
        arch, arch_kwargs, preprocessing = args.arch, args.arch_kwargs, Preprocessing()
        model = build_model(arch, **arch_kwargs)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)

    shared = shared_dir()
    started = time.perf_counter()
    train_images, train_labels = decode_images(open_dataset(args.train or str(shared / "data/cifar10/train")),
                                               progress=not args.no_progress)
    eval_images, eval_labels = decode_images(open_dataset(
        args.eval or str(shared / "data/cifar10/subsets/test-1000.txt")), progress=not args.no_progress)
    print(f"decoded {len(train_images)} training and {len(eval_images)} evaluation images "
          f"in {time.perf_counter() - started:.0f} s")
    normalisation = (preprocessing.mean, preprocessing.std)
    train_loader = TensorBatches(train_images, train_labels, args.batch_size, *normalisation, augment=True,
                                 shuffle=True, seed=args.seed, cutout=args.cutout)
    eval_loader = TensorBatches(eval_images, eval_labels, 500, *normalisation, augment=False, shuffle=False)

    config = args.config
    fit_options = {"eval_loader": eval_loader, "state_path": Path(f"{args.out}.state"),
                   "progress": not args.no_progress}
    if args.qbits is None:
        result = train(model, train_loader, config, **fit_options)
    else:
        result = finetune(model, train_loader, qbits=args.bits, per_channel=args.per_channel,
                          quantize_streams=args.quantize_streams, config=config, **fit_options)
    training = {"command": " ".join(["python", "tools/train.py", *(argv if argv is not None else sys.argv[1:])]),
                "init": str(args.init) if args.init else None, "epochs": args.epochs,
                "spike_penalty": args.spike_penalty, "synops_penalty": args.synops_penalty, "history": result.history,
                "device": str(device), "eval_accuracy_ann": accuracy(result.model, eval_loader)}
    if args.qbits is not None:
        qann = quantize(result.model, None, args.bits, thresholds=result.thresholds,
                        quantize_streams=args.quantize_streams)
        training["eval_accuracy_qann"] = accuracy(qann, eval_loader)
    weights = result.model.half() if args.half else result.model
    temporary = args.out.with_name(args.out.name + ".tmp")
    save_checkpoint(weights, temporary, arch, arch_kwargs, preprocessing, quantization=result.quantization,
                    training=training)
    os.replace(temporary, args.out)
    Path(f"{args.out}.state").unlink(missing_ok=True)
    print(f"wrote {args.out}: " + ", ".join(f"{key.removeprefix('eval_accuracy_').upper()} {value:.2f} %"
                                            for key, value in training.items() if key.startswith("eval_accuracy"))
          + " on the evaluation data")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
