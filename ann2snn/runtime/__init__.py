"""The spiking runtime: SpikingNetwork and its simulator, neurons and their registry, codings, kernels."""
