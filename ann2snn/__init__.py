"""ann2snn: compile trained PyTorch ANNs into equivalent spiking neural networks."""
from __future__ import annotations

import importlib
from typing import Any

# The public names and the modules that define them, imported on first use (PEP 562): `import ann2snn.cli` for
# `ann2snn --help` must not import torch, which takes seconds.
_DEFINED_IN = {
    **dict.fromkeys(("convert", "convert_qann", "prepare_pipeline", "quantize"), "ann2snn.compiler.convert"),
    **dict.fromkeys(("ConversionConfig", "EncodingConfig", "NeuronConfig", "QuantizationConfig", "SimulationConfig"),
                    "ann2snn.config"),
    "ConversionError": "ann2snn.errors",
    "evaluate": "ann2snn.evaluation.evaluate",
    "export_onnx": "ann2snn.interop.onnx",
    **dict.fromkeys(("export_nir", "import_nir"), "ann2snn.interop.nir"),
    "load": "ann2snn.io.saved_network",
    **dict.fromkeys(("SimulationResult", "SpikingNetwork"), "ann2snn.runtime.network"),
    **dict.fromkeys(("AdaptiveNeuron", "IFNeuron", "LIFNeuron", "SignedNeuron", "SpikingNeuron"),
                    "ann2snn.runtime.neurons"),
    "finetune": "ann2snn.training.finetune",
    **dict.fromkeys(("Conversion", "Execution", "Pruning", "analyze_network", "convert_checkpoint", "evaluate_saved",
                     "save", "write_conversion"), "ann2snn.workflow"),
}


def __getattr__(name: str) -> Any:
    if name not in _DEFINED_IN:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_DEFINED_IN[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_DEFINED_IN})


__all__ = sorted(_DEFINED_IN)
__version__ = "0.1.0"
