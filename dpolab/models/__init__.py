"""Causal LMs: loading them (:mod:`~dpolab.models.loading`: the embedded default, any hub id or folder, a saved LoRA
adapter on its base, the tiny test models by name), LoRA adapters through peft (:mod:`~dpolab.models.lora`), and the
tiny randomly initialised test models (:mod:`~dpolab.models.tiny`).

``dpolab.models.load_model`` and ``dpolab.models.load_policy`` (and the other public names of the former
``dpolab/models.py``) are re-exported here.
"""

from dpolab.models.loading import (
    DEFAULT_GGUF,
    DEFAULT_MODEL,
    DEFAULT_WHEEL,
    DTYPES,
    INSTALL_HINT,
    TINY_MODELS,
    default_gguf_path,
    default_model_dir,
    hub_endpoint,
    hub_reachable,
    load_model,
    load_policy,
    looks_local,
    torch_dtype,
    with_pad_token,
)

__all__ = ["DEFAULT_GGUF", "DEFAULT_MODEL", "DEFAULT_WHEEL", "DTYPES", "INSTALL_HINT", "TINY_MODELS",
           "default_gguf_path", "default_model_dir", "hub_endpoint", "hub_reachable", "load_model", "load_policy",
           "looks_local", "torch_dtype", "with_pad_token"]
