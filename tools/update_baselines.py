"""Re-measure the accuracy baselines CI checks against (`calibration/baselines.json`) after an intended
change, print old vs new, and rewrite the file.

    python tools/update_baselines.py                 # every entry
    python tools/update_baselines.py --only resnet20-q4/signed
    python tools/update_baselines.py --manifests     # also re-record the subset lists' hashes

Entries (checkpoint, conversion settings, T values, tolerance) are edited by hand in the JSON file;
this tool only fills in their accuracies.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ann2snn.evaluation.regression import (
    BASELINES_FILE,
    MANIFESTS_FILE,
    check_manifests,
    compare,
    format_table,
    load_baselines,
    measure,
    write_baselines,
)
from ann2snn.io.atomic import atomic_write  # noqa: E402
from ann2snn.io.data import shared_dir  # noqa: E402


def record_manifests(shared: Path) -> None:
    manifests = json.loads(MANIFESTS_FILE.read_text())
    for manifest in manifests["subsets"].values():
        path = shared / manifest["path"]
        manifest["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        manifest["images"] = sum(1 for line in path.read_text().splitlines() if line.strip())
    atomic_write(MANIFESTS_FILE, (json.dumps(manifests, indent=2) + "\n").encode())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", metavar="NAME", help="re-measure only this entry (repeatable)")
    parser.add_argument("--manifests", action="store_true", help="re-record the subset lists' hashes first")
    parser.add_argument("--dry-run", action="store_true", help="print the comparison, write nothing")
    args = parser.parse_args(argv)

    shared = shared_dir()
    if args.manifests:
        record_manifests(shared)
    subsets = check_manifests(shared)
    baselines = load_baselines()
    names = args.only or list(baselines["models"])
    unknown = sorted(set(names) - set(baselines["models"]))
    if unknown:
        parser.error(f"no baseline entry named {', '.join(unknown)}; entries: {', '.join(baselines['models'])}")
    measured = {}
    for name in names:
        print(f"measuring {name} ...", flush=True)
        measured[name] = measure(baselines["models"][name], shared, subsets)
    # Entries added by hand have no accuracy yet: nothing to compare them with.
    old = {"models": {name: baselines["models"][name] for name in names if baselines["models"][name].get("accuracy")}}
    print(format_table(compare(old, measured)))
    if not args.dry_run:
        for name, accuracy in measured.items():
            baselines["models"][name]["accuracy"] = {key: _rounded(value) for key, value in accuracy.items()}
        write_baselines(baselines)
        print(f"wrote {BASELINES_FILE}")
    return 0


def _rounded(value: float | dict) -> float | dict:
    return {key: round(item, 2) for key, item in value.items()} if isinstance(value, dict) else round(value, 2)


if __name__ == "__main__":
    raise SystemExit(main())
