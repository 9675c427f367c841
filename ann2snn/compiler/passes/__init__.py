"""Graph passes, one per file. Each takes a GraphModule and returns one (trace takes the nn.Module)."""
from ann2snn.compiler.passes.balance_thresholds import balance_thresholds
from ann2snn.compiler.passes.calibrate_spiking import calibrate_spiking
from ann2snn.compiler.passes.calibrate_thresholds import calibrate_thresholds, observing
from ann2snn.compiler.passes.check_supported import check_supported
from ann2snn.compiler.passes.emit_neurons import emit_neurons
from ann2snn.compiler.passes.fold_batchnorm import fold_batchnorm
from ann2snn.compiler.passes.insert_encoder import insert_encoder
from ann2snn.compiler.passes.insert_quantizers import insert_quantizers
from ann2snn.compiler.passes.mark_streams import mark_streams
from ann2snn.compiler.passes.normalize_activations import normalize_activations
from ann2snn.compiler.passes.reconstruct_blocks import reconstruct_blocks
from ann2snn.compiler.passes.remove_identities import remove_identities
from ann2snn.compiler.passes.set_thresholds import set_thresholds
from ann2snn.compiler.passes.trace import trace

__all__ = [
    "balance_thresholds", "calibrate_spiking", "calibrate_thresholds", "check_supported", "emit_neurons",
    "fold_batchnorm", "insert_encoder", "insert_quantizers", "mark_streams", "normalize_activations", "observing",
    "reconstruct_blocks", "remove_identities", "set_thresholds", "trace",
]
