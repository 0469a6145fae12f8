"""LoRA adapters through peft's own config: adding one to a policy, its dropout in training, and putting a saved
adapter back on its base model (optionally merged into it).

A LoRA layer (Hu et al. 2021, arXiv 2106.09685) adds a low-rank update to a frozen weight W::

    h = W x + s · B A dropout(x),   A: (r, d_in), B: (d_out, r), B = 0 at the start

with s = α / r, or s = α / √r under rank-stabilised scaling (rsLoRA, Kalajdzievski 2023, arXiv 2312.03732).
DoRA (Liu et al. 2024, arXiv 2402.09353) writes the adapted weight as a learned magnitude times a direction,
m ⊙ (W + s B A) / ‖W + s B A‖ (norm per output), with m = ‖W‖ at the start. Either way the adapted policy
starts as the base model (π_θ = π_ref at step 0), and switching the adapter off gives back W x exactly: the
"adapter" reference of :mod:`dpolab.train.reference`, unless biases train too (peft's ``bias`` other than "none").

A saved adapter is peft's format: ``adapter_config.json`` (the LoRA settings and the base model's name or path
and revision) and ``adapter_model.safetensors`` (the adapter's tensors only). :func:`dpolab.models.load_model`
loads the base model, then the adapter with :func:`attach_adapter`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ALL_LINEAR = "all-linear"
"""peft's name for every linear layer but the output layer."""


def add_lora(
    model: torch.nn.Module,
    rank: int,
    alpha: float,
    *,
    target_modules: str | Sequence[str] = ALL_LINEAR,
    dropout: float = 0.0,
    bias: str = "none",
    use_rslora: bool = False,
    use_dora: bool = False,
    modules_to_save: Sequence[str] = (),
    revision: str | None = None,
):
    """Wrap ``model`` with a fresh peft LoRA adapter (the base weights frozen); a peft model is returned as it is.

    Args:
        rank, alpha: r and α; the update is scaled by α / r (α / √r with ``use_rslora``).
        target_modules: module names or name suffixes that get an adapter (e.g. ``["q_proj", "v_proj"]``), or
            ``"all-linear"`` (also as the one-item list ``["all-linear"]``).
        dropout: dropout on the adapter's input, active only within :func:`adapter_dropout`.
        bias: peft's ``bias``: ``"none"``, ``"all"`` (every bias of the model trains) or ``"lora_only"`` (those
            of the adapted layers).
        use_rslora, use_dora: rank-stabilised scaling; DoRA's magnitude and direction.
        modules_to_save: modules trained in full beside the adapter and saved with it (the originals are kept
            for the adapter switched off).
        revision: the base model's hub revision, recorded in ``adapter_config.json`` for reloading.
    """
    from peft import LoraConfig, get_peft_model

    if hasattr(model, "disable_adapter"):
        return model  # already a peft model: train the adapter it has
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, bias=bias, use_rslora=use_rslora,
                        use_dora=use_dora, modules_to_save=list(modules_to_save) or None, revision=revision,
                        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    base = peft_model.peft_config["default"].base_model_name_or_path
    if base and Path(base).is_dir():  # a relative folder would not be found from another working directory
        peft_model.peft_config["default"].base_model_name_or_path = str(Path(base).resolve())
    return peft_model


@contextlib.contextmanager
def adapter_dropout(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, the LoRA dropout of ``model`` is active; every other module keeps its mode.

    dpolab trains the policy in eval mode (the model's own dropout off, as trl's ``disable_dropout``), so an
    adapter's dropout acts only where it is switched on here: the training forwards of a step. Sets ``training``
    on peft's LoRA layers that have a dropout (DoRA reads the layer's own flag) and on their dropout modules,
    not recursively (the base layer inside stays as it was), and restores them after. A no-op without LoRA
    dropout.
    """
    flags = []
    for layer in model.modules():  # peft's LoRA layers, found by their dropout (no peft import for other models)
        if isinstance(getattr(layer, "lora_dropout", None), torch.nn.ModuleDict):
            dropouts = [d for d in layer.lora_dropout.values() if not isinstance(d, torch.nn.Identity)]
            if dropouts:
                flags += [(m, m.training) for m in (layer, *dropouts)]
    for module, _ in flags:
        module.training = True
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def is_adapter_folder(path: str | Path) -> bool:
    """Whether ``path`` is a folder holding a saved peft adapter (``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(folder: str | Path) -> tuple[str, str | None]:
    """``(name or path, revision)`` of the base model that the adapter saved in ``folder`` was trained on."""
    path = Path(folder) / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
        base, revision = config.get("base_model_name_or_path"), config.get("revision")
    except (OSError, ValueError, AttributeError) as err:
        raise ValueError(f"{path} is not a readable peft adapter config ({err})") from None
    if not base:
        raise ValueError(f"{path} names no base model (base_model_name_or_path is empty: the run started from a "
                         "model built in memory, such as tiny-gpt2). Load that base model yourself and add the "
                         f"adapter with dpolab.models.lora.attach_adapter(base, {str(folder)!r})")
    return base, revision


def attach_adapter(base: torch.nn.Module, folder: str | Path, *, merge: bool = False) -> torch.nn.Module:
    """The peft model of ``base`` with the adapter saved in ``folder``, trainable as it was in training; with
    ``merge``, the adapter folded into the base weights (peft's ``merge_and_unload``: W ← W + s B A, or DoRA's
    merged weight) and a plain transformers model returned, all its weights trainable as a loaded model's are."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(base, str(folder), is_trainable=True)
    if merge:
        model = model.merge_and_unload().requires_grad_(True)
    return model.eval()
