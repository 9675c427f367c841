"""tools/train.py: bad bit settings are refused before the training data is decoded, naming the option."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("train", Path(__file__).resolve().parents[2] / "tools" / "train.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)
COMMON = ["--init", "models/resnet20.pt", "--epochs", "1", "--out", "out.pt"]


def test_per_layer_bits_from_a_file_with_qbits_as_the_default(tmp_path):
    config = tmp_path / "bits.json"
    config.write_text(json.dumps({"layer1.0.relu": 2, "first": 8}))
    args = train.parse_arguments([*COMMON, "--qbits", "4", "--qbits-config", str(config)])
    assert args.bits == {"layer1.0.relu": 2, "first": 8, "default": 4}
    assert train.parse_arguments([*COMMON, "--qbits", "3"]).bits == 3


@pytest.mark.parametrize(("content", "message"), [
    (None, "No such file"), ("[4]", "expected a JSON object"),
    ('{"first": 9}', "qbits of 'first' must be an integer in 1..8, got 9")])
def test_a_bad_bits_file_is_refused_naming_it(tmp_path, capsys, content, message):
    config = tmp_path / "bits.json"
    if content is not None:
        config.write_text(content)
    with pytest.raises(SystemExit):
        train.parse_arguments([*COMMON, "--qbits", "4", "--qbits-config", str(config)])
    error = capsys.readouterr().err
    assert "--qbits-config" in error and str(config) in error and message in error


def test_a_bits_file_needs_qbits(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_arguments([*COMMON, "--qbits-config", str(tmp_path / "bits.json")])
    assert "--qbits-config needs --qbits" in capsys.readouterr().err
