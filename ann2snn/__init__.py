"""ann2snn: compile trained PyTorch ANNs into equivalent spiking neural networks."""
from ann2snn.compiler.convert import convert, convert_qann, prepare_pipeline, quantize
from ann2snn.config import ConversionConfig, EncodingConfig, NeuronConfig, QuantizationConfig, SimulationConfig
from ann2snn.errors import ConversionError
from ann2snn.evaluation.evaluate import evaluate
from ann2snn.interop.onnx import export_onnx
from ann2snn.io.saved_network import load
from ann2snn.runtime.network import SimulationResult, SpikingNetwork
from ann2snn.runtime.neurons import AdaptiveNeuron, IFNeuron, LIFNeuron, SignedNeuron, SpikingNeuron
from ann2snn.training.finetune import finetune
from ann2snn.workflow import (
    Conversion,
    Execution,
    Pruning,
    analyze_network,
    convert_checkpoint,
    evaluate_saved,
    save,
    write_conversion,
)

__all__ = [
    "AdaptiveNeuron", "Conversion", "ConversionConfig", "ConversionError", "EncodingConfig", "Execution", "IFNeuron",
    "LIFNeuron", "NeuronConfig", "Pruning", "QuantizationConfig", "SignedNeuron", "SimulationConfig",
    "SimulationResult", "SpikingNetwork", "SpikingNeuron", "analyze_network", "convert", "convert_checkpoint",
    "convert_qann", "evaluate", "evaluate_saved", "export_onnx", "finetune", "load", "prepare_pipeline", "quantize",
    "save", "write_conversion",
]
__version__ = "0.1.0"
