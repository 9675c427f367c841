"""Hand-written and compiled kernels for the neurons' time steps."""
