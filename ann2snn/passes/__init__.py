"""Graph passes, one per file. Each takes a GraphModule and returns one (trace takes the nn.Module)."""
from .balance_thresholds import balance_thresholds
from .calibrate_thresholds import calibrate_thresholds, observing
from .check_supported import check_supported
from .emit_neurons import emit_neurons
from .fold_batchnorm import fold_batchnorm
from .insert_encoder import insert_encoder
from .insert_quantizers import insert_quantizers
from .normalize_activations import normalize_activations
from .remove_identities import remove_identities
from .set_thresholds import set_thresholds
from .trace import trace

__all__ = [
    "balance_thresholds", "calibrate_thresholds", "check_supported", "emit_neurons", "fold_batchnorm",
    "insert_encoder", "insert_quantizers", "normalize_activations", "observing", "remove_identities",
    "set_thresholds", "trace",
]
