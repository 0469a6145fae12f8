"""Experiments: compositions of library calls that reproduce the paper's results."""
