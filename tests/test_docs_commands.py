"""The commands the READMEs print beside the baselines' figures are the commands that measured them: each is parsed
by the command line and compared with its calibration/baselines.json entry."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from ann2snn.cli.arguments import conversion_settings
from ann2snn.cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
BASELINES = json.loads((ROOT / "calibration" / "baselines.json").read_text())["models"]


def _measured_by(command: str) -> tuple[str, dict, list[int] | None]:
    """The checkpoint, conversion settings and T list that `command` asks for (T left out: the baselines keep the
    default, and a settling network's results do not depend on it)."""
    args = build_parser().parse_args(shlex.split(command)[1:])
    settings = {key: value for key, value in conversion_settings(args).items() if key != "T"}
    return args.checkpoint.name, settings, args.T_list


def _models_readme_rows() -> dict[str, str]:
    """entry -> command of the models/README.md table whose rows name a baselines entry and its command."""
    rows = re.findall(r"^\| `([^`]+)`[^|]*\| `(ann2snn convert [^`]+)` \|", (ROOT / "models" / "README.md").read_text(),
                      re.MULTILINE)
    return dict(rows)


@pytest.mark.parametrize("entry", ["resnet20-q4/signed", "resnet20-q2/signed", "resnet20/default"])
def test_models_readme_commands_are_those_of_their_baselines(entry: str) -> None:
    # reported: the command for resnet20-q4.pt lacked the --max-spikes-per-step 2 its table needs (16 % at T = 8)
    command = _models_readme_rows().get(entry)
    assert command is not None, f"models/README.md prints no command for {entry}"
    baseline = BASELINES[entry]
    checkpoint, settings, T_list = _measured_by(command)
    assert checkpoint == Path(baseline["checkpoint"]).name
    assert settings == {key: value for key, value in baseline["conversion"].items() if key != "T"}
    assert T_list == baseline["T_list"]


def test_readme_training_section_converts_as_the_baseline_does() -> None:
    commands = [line.split("  #")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("ann2snn convert models/resnet20-q4.pt")]
    assert commands, "README.md converts models/resnet20-q4.pt nowhere"
    baseline = BASELINES["resnet20-q4/signed"]
    for command in commands:
        _, settings, T_list = _measured_by(command)
        assert settings == baseline["conversion"] and T_list == baseline["T_list"], command
