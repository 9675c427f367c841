"""`ann2snn baseline record | check | update`: accuracy-regression baselines (see `ann2snn.baselines`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ann2snn.cli import arguments
from ann2snn.cli.arguments import DEFAULT_CALIBRATION, DEFAULT_EVALUATION, PROGRAM, UsageError
from ann2snn.evaluation.regression import (
    BASELINES_FORMAT,
    BASELINES_VERSION,
    Comparison,
    Tolerance,
    format_table,
    load_baselines,
    measurement,
    write_baselines,
)


def add_parser(commands: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    parser = commands.add_parser(
        "baseline", help="record and check accuracy-regression baselines (for CI)",
        description="Record what conversions measure (accuracy, spikes, synaptic operations, energy) and check "
                    "later conversions against it: `check` exits 1 on a regression.")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")

    record = actions.add_parser(
        "record", parents=parents, help="convert checkpoints and store what they measure",
        description="Convert and evaluate each CHECKPOINT with the options given, and store the options and the "
                    "measured values as baselines in FILE (new, or a baselines file to add entries to).")
    record.add_argument("checkpoints", type=Path, nargs="+", metavar="CHECKPOINT")
    record.add_argument("--out", type=Path, required=True, metavar="FILE", help="the baselines file")
    record.add_argument("--name", action="append", metavar="NAME",
                        help="entry name, once per checkpoint (default <checkpoint stem>/<neuron>)")
    arguments.add_data_argument(record, DEFAULT_EVALUATION, "evaluation data")
    record.add_argument("--accuracy-tolerance", type=float, default=Tolerance.accuracy, metavar="POINTS",
                        help=f"a regression is an accuracy lower by more than POINTS (default {Tolerance.accuracy})")
    record.add_argument("--activity-tolerance", type=float, default=Tolerance.activity, metavar="FRACTION",
                        help="or spikes, synaptic operations or energy per image higher by more than FRACTION "
                             f"(default {Tolerance.activity})")
    record.set_defaults(handler=run_record)

    for action, description in (("check", "Re-convert every entry of FILE and compare with its baselines; exit 1 "
                                           "on a regression."),
                                ("update", "Re-convert every entry of FILE and make the new values its baselines, "
                                           "after an intended change.")):
        checking = actions.add_parser(action, help=description.split(";")[0].split(",")[0].lower(),
                                      description=description)
        checking.add_argument("file", type=Path, metavar="FILE")
        checking.add_argument("--only", action="append", metavar="NAME", help="only this entry (repeatable)")
        checking.add_argument("--trust-pickle", action="store_true",
                              help="allow checkpoints holding pickled Python objects (can run arbitrary code)")
        checking.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
        checking.add_argument("--no-progress", action="store_true", help="no progress bars")
        checking.set_defaults(handler=run_check if action == "check" else run_update)


def _entry_names(args: argparse.Namespace, settings: dict) -> list[str]:
    names = args.name or [f"{path.stem}/{settings.get('neuron', 'default')}" for path in args.checkpoints]
    if len(names) != len(args.checkpoints):
        raise UsageError(f"--name is given {len(names)} times for {len(args.checkpoints)} checkpoints")
    if len(set(names)) != len(names):
        raise UsageError(f"entry names must differ, got {', '.join(names)}; pass --name for each checkpoint")
    return names


def run_record(args: argparse.Namespace) -> int:
    from ann2snn import baselines

    settings = arguments.conversion_settings(args)
    names = _entry_names(args, settings)
    missing = [str(path) for path in args.checkpoints if not path.is_file()]
    if missing:
        raise UsageError(f"checkpoint {', '.join(missing)} not found")
    tolerance = Tolerance(args.accuracy_tolerance, args.activity_tolerance)
    base = args.out.absolute().parent
    data = {"calibration": arguments.data_spec(args.calib, DEFAULT_CALIBRATION, "--calib"),
            "evaluation": arguments.data_spec(args.data, DEFAULT_EVALUATION, "--data")}
    records = {role: baselines.data_record(spec, base) for role, spec in data.items()}
    if args.out.exists():
        document = load_baselines(args.out)  # refuses a file that is not ours
        if document["data"] != records:
            raise UsageError(f"{args.out} was recorded on other data ({document['data']['evaluation']['spec']}); "
                             "record these baselines in another file")
        clashes = [name for name in names if name in document["models"]]
        if clashes and not args.force:
            raise UsageError(f"{args.out} has entries named {', '.join(clashes)}; pass --force to replace them")
    else:
        document = {"format": BASELINES_FORMAT, "version": BASELINES_VERSION, "data": records, "models": {}}
    options = {"calib_size": args.calib_size, "eval_size": args.eval_size, "seed": args.seed,
               "batch_size": args.batch_size, "stop_when_quiet": args.stop_when_quiet or None,
               "recalibrate": args.recalibrate, "qbits_budget": args.qbits_budget,
               "pruning": arguments.pruning(args), "energy_preset": args.energy_preset}
    load = {"arch": args.arch, "num_classes": args.num_classes, **arguments.preprocessing_overrides(args)}
    pending = {name: baselines.new_entry(path, base, load=load, conversion=settings, options=options,
                                         T_list=args.T_list, tolerance=tolerance)
               for name, path in zip(names, args.checkpoints)}
    execution = arguments.execution(args)
    for name, entry in pending.items():
        report = baselines.measure(entry, data, base, trust_pickle=args.trust_pickle, execution=execution)
        document["models"][name] = baselines.with_measurement(entry, report)
    write_baselines(document, args.out)
    rows = baselines.comparisons(document, {name: document["models"][name]["baseline"] for name in pending})
    print(_table_of_values(rows))
    print(f"\nRecorded {', '.join(pending)} in {args.out}")
    return 0


def _table_of_values(rows: list[Comparison]) -> str:
    lines = ["| model | metric | value | limit |", "|---|---|---|---|"]
    lines += [f"| {row.entry} | {row.metric} | {row.baseline:.4g} | {'≥' if row.higher_is_better else '≤'} "
              f"{row.limit:.4g} |" for row in rows]
    return "\n".join(lines)


def _measure_all(args: argparse.Namespace) -> tuple[dict, dict]:
    """The baselines file and the report of every entry asked for, measured anew."""
    from ann2snn import baselines
    from ann2snn.workflow import Execution

    document = baselines.read(args.file)
    names = baselines.entries(document, args.only)
    base = args.file.absolute().parent
    data = baselines.checked_data(document, base)
    execution = Execution(device=arguments.device(args.device), progress=not args.no_progress)
    measured = {name: baselines.measure(document["models"][name], data, base, trust_pickle=args.trust_pickle,
                                        execution=execution) for name in names}
    return document, measured


def run_check(args: argparse.Namespace) -> int:
    from ann2snn import baselines

    document, measured = _measure_all(args)
    rows = baselines.comparisons(document, {name: measurement(report) for name, report in measured.items()})
    print(format_table(rows))
    failed = [row for row in rows if not row.passed]
    if failed:
        entries = sorted({row.entry for row in failed})
        print(f"{PROGRAM}: regression: {len(failed)} of {len(rows)} metrics beyond their tolerance "
              f"({', '.join(entries)})")
        return 1
    print(f"\nNo regression: {len(rows)} metrics of {len(measured)} entries within their tolerance")
    return 0


def run_update(args: argparse.Namespace) -> int:
    from ann2snn import baselines

    document, measured = _measure_all(args)
    rows = baselines.comparisons(document, {name: measurement(report) for name, report in measured.items()})
    print(format_table(rows))
    for name, report in measured.items():
        document["models"][name] = baselines.with_measurement(document["models"][name], report)
    write_baselines(document, args.file)
    print(f"\nUpdated {', '.join(measured)} in {args.file}")
    return 0
