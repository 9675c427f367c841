"""Measuring networks: evaluation, operation and energy counts, analysis, reports, accuracy baselines."""
