"""The label convention of every batch: which positions are scored. A leaf module (nothing else of dpolab), so the
log-prob kernels can use it without the data pipeline."""

IGNORE_INDEX = -100
"""The label of a position that is not scored (prompt, padding, masked turns); PyTorch's cross-entropy default."""
