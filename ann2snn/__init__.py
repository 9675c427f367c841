"""ann2snn: compile trained PyTorch ANNs into equivalent spiking neural networks."""
from .api import convert, convert_qann, prepare_pipeline, quantize
from .errors import ConversionError
from .neurons import AdaptiveNeuron, IFNeuron, LIFNeuron, SignedNeuron, SpikingNeuron
from .snn import SimulationResult, SpikingNetwork

__all__ = [
    "AdaptiveNeuron", "ConversionError", "IFNeuron", "LIFNeuron", "SignedNeuron", "SimulationResult", "SpikingNetwork", "SpikingNeuron",
    "convert", "convert_qann", "prepare_pipeline", "quantize",
]
__version__ = "0.1.0"
from .evaluate import evaluate
from .finetune import finetune
from .onnx_export import export_onnx
from .serialization import load, save
__all__ += ["evaluate", "export_onnx", "finetune", "load", "save"]
