"""Changing the ANN before conversion: training and quantization-aware fine-tuning, pruning, bit allocation."""
