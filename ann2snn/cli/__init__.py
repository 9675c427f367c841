"""The command line: argument definitions and one thin module per command over `ann2snn.workflow`."""
from ann2snn.cli.main import main

__all__ = ["main"]
