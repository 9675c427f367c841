"""ann2snn: compile trained PyTorch ANNs into equivalent spiking neural networks."""
from ann2snn.compiler.convert import convert, convert_qann, prepare_pipeline, quantize
from ann2snn.errors import ConversionError
from ann2snn.runtime.neurons import AdaptiveNeuron, IFNeuron, LIFNeuron, SignedNeuron, SpikingNeuron
from ann2snn.runtime.network import SimulationResult, SpikingNetwork

__all__ = [
    "AdaptiveNeuron", "ConversionError", "IFNeuron", "LIFNeuron", "SignedNeuron", "SimulationResult", "SpikingNetwork", "SpikingNeuron",
    "convert", "convert_qann", "prepare_pipeline", "quantize",
]
__version__ = "0.1.0"
from ann2snn.evaluation.evaluate import evaluate
from ann2snn.training.finetune import finetune
from ann2snn.interop.onnx import export_onnx
from ann2snn.io.saved_network import load
from ann2snn.workflow import save
__all__ += ["evaluate", "export_onnx", "finetune", "load", "save"]
