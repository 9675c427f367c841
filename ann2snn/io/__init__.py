"""Files and data: checkpoints, saved networks, data sets and batches, atomic writes."""
