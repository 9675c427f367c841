"""Accuracy-regression baselines that a user's CI and ours check (`ann2snn baseline record | check | update`).

    ann2snn baseline record models/mobilenet_v2.pt --T 32 --T-list 16,32 --out baselines.json
    ann2snn baseline check baselines.json      # re-converts every entry; exit 1 and an old-vs-new table on a regression
    ann2snn baseline update baselines.json     # after an intended change: the new values become the baselines

A baselines file is a JSON document (what counts as a regression: `ann2snn.evaluation.regression`):

    {"format": "ann2snn-baselines", "version": 2,
     "data": {"calibration": DATA, "evaluation": DATA},        DATA = {"spec", "images", "sha256"}
     "models": {NAME: {"checkpoint", "load", "conversion", "options", "T_list", "tolerance",
                       "baseline", "config", "versions", "recorded"}}}

`load` holds the model options given (arch, num_classes, mean, std, image_size); `conversion` the conversion
settings given, flat as `ann2snn.config` records name them: the rest take the defaults of the ann2snn that
checks, so a changed default is checked too; `options` the others (calib_size, eval_size, seed, batch_size,
stop_when_quiet, recalibrate, qbits_budget, pruning, energy_preset: the hardware the memory-aware energy is
priced for, fp32-45nm in entries from before it). `config` (the configuration resolved when recording)
and `versions` are there for the reader. Paths are relative to the file's directory, or `<shared>/...` below
the shared data directory ($ANN2SNN_SHARED), so that the file works from any working directory and on any
machine with the same data. Data whose fingerprint (every image's bytes and label) differs from the recorded
one is refused before anything is converted. A pickled checkpoint needs --trust-pickle on the command line;
the file cannot grant it.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ann2snn.config import SimulationConfig
from ann2snn.evaluation.energy import DEFAULT_ENERGY_PRESET
from ann2snn.evaluation.provenance import software_versions, utc_now
from ann2snn.evaluation.regression import Comparison, Tolerance, compare, load_baselines, measurement
from ann2snn.io.data import fingerprint, map_spec_path, open_dataset, shared_dir
from ann2snn.io.model_loading import load_model
from ann2snn.workflow import Execution, Pruning, convert_checkpoint, default_T_list

SHARED_PREFIX = "<shared>/"


class BaselineError(ValueError):
    """A baselines file cannot be used as it is (other data, an unknown entry, a clash)."""


def portable_path(path: str | Path, base: Path) -> str:
    """`path` as a baselines file stores it: below the shared data directory as <shared>/..., else relative to
    the file's directory `base`."""
    absolute = Path(os.path.abspath(path))
    shared = shared_dir()
    if absolute.is_relative_to(shared):
        return SHARED_PREFIX + absolute.relative_to(shared).as_posix()
    return Path(os.path.relpath(absolute, base.absolute())).as_posix()


def resolve_path(stored: str, base: Path) -> Path:
    if stored.startswith(SHARED_PREFIX):
        return shared_dir() / stored.removeprefix(SHARED_PREFIX)
    return base / stored


def _portable_spec(spec: str, base: Path) -> str:
    return map_spec_path(spec, lambda path: portable_path(path, base))


def _resolved_spec(stored: str, base: Path) -> str:
    return map_spec_path(stored, lambda path: str(resolve_path(path, base)))


def data_record(spec: str, base: Path) -> dict[str, Any]:
    dataset = open_dataset(spec)
    return {"spec": _portable_spec(spec, base), "images": len(dataset), "sha256": fingerprint(dataset)}


def checked_data(document: Mapping[str, Any], base: Path) -> dict[str, str]:
    """The data specs of a baselines file, resolved, after checking that each is the data it was recorded on."""
    specs = {}
    for role, record in document["data"].items():
        spec = _resolved_spec(record["spec"], base)
        dataset = open_dataset(spec)
        found = fingerprint(dataset)
        if len(dataset) != record["images"] or found != record["sha256"]:
            raise BaselineError(
                f"{role} data {spec} is not the data the baselines were recorded on ({record['images']} images, sha256 "
                f"{record['sha256'][:12]}...; found {len(dataset)} images, {found[:12]}...); record them anew with "
                "`ann2snn baseline update` if the change is intended")
        specs[role] = spec
    return specs


def measure(entry: Mapping[str, Any], data: Mapping[str, str], base: Path, *, trust_pickle: bool = False,
            execution: Execution = Execution()) -> dict[str, Any]:
    """Convert and evaluate one entry as it says, on the resolved `data`: the report.json document."""
    load, options = entry["load"], dict(entry["options"])
    loaded = load_model(resolve_path(entry["checkpoint"], base), arch=load.get("arch"),
                        num_classes=load.get("num_classes"),
                        preprocessing={key: load[key] for key in ("mean", "std", "image_size", "resize")
                                       if key in load},
                        trust_pickle=trust_pickle)
    pruning = options.pop("pruning", None)
    if pruning is not None:
        finetune_data = pruning.get("finetune_data")
        pruning = Pruning(**{**pruning, "finetune_data": finetune_data and _resolved_spec(finetune_data, base)})
    execution = dataclasses.replace(execution, seed=options.pop("seed", 0),
                                    batch_size=options.pop("batch_size", Execution.batch_size),
                                    stop_when_quiet=options.pop("stop_when_quiet", False),
                                    energy_preset=options.pop("energy_preset", DEFAULT_ENERGY_PRESET))
    conversion = convert_checkpoint(loaded, source=resolve_path(entry["checkpoint"], base), calib=data["calibration"],
                                    eval=data["evaluation"], T_list=entry["T_list"], pruning=pruning,
                                    execution=execution, **options, **entry["conversion"])
    return conversion.report


def new_entry(checkpoint: Path, base: Path, *, load: Mapping[str, Any], conversion: Mapping[str, Any],
              options: Mapping[str, Any], T_list: list[int] | None, tolerance: Tolerance) -> dict[str, Any]:
    """An entry not yet measured; `options` as the module docstring lists them (pruning a `Pruning`)."""
    stored_options = {key: value for key, value in options.items() if value is not None and key != "pruning"}
    pruning = options.get("pruning")
    if pruning is not None:
        record = dataclasses.asdict(pruning)
        if record["finetune_data"] is not None:
            record["finetune_data"] = _portable_spec(record["finetune_data"], base)
        stored_options["pruning"] = record
    return {"checkpoint": portable_path(checkpoint, base),
            "load": {key: value for key, value in load.items() if value is not None},
            "conversion": dict(conversion), "options": stored_options,
            "T_list": sorted(T_list or default_T_list(conversion.get("T", SimulationConfig.T))),
            "tolerance": tolerance.to_dict()}


def with_measurement(entry: Mapping[str, Any], report: Mapping[str, Any]) -> dict[str, Any]:
    """The entry with `report`'s values as its baseline."""
    return {**entry, "baseline": measurement(dict(report)), "config": report["config"], "versions": software_versions(),
            "recorded": utc_now()}


def entries(document: Mapping[str, Any], only: Iterable[str] | None) -> list[str]:
    names = list(only or document["models"])
    unknown = [name for name in names if name not in document["models"]]
    if unknown:
        raise BaselineError(f"no baseline entry named {', '.join(unknown)}; the entries are "
                            f"{', '.join(document['models'])}")
    return names


def comparisons(document: Mapping[str, Any], measured: Mapping[str, Mapping[str, Any]]) -> list[Comparison]:
    """Every metric of every entry measured (`measured`: name -> `measurement`), against its baseline."""
    rows = []
    for name, values in measured.items():
        entry = document["models"][name]
        rows += compare(name, entry["baseline"], dict(values), Tolerance.from_dict(entry["tolerance"]))
    return rows


def read(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"baselines file {path} not found")
    return load_baselines(path)
