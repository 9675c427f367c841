"""The compiler: torch.fx passes from the traced ANN to the spiking graph, run by a pass manager."""
