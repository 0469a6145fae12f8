"""Memory planning before a run: ``dpolab plan --config X [--device-memory 80GB]``.

For a training config (``dpolab train``) or a sentiment-experiment config (``dpolab reproduce``) it counts the
model's parameters exactly (the architecture built on the ``meta`` device: no weights are loaded or allocated) and
estimates, in bytes, what the largest stage holds at its peak:

- weights: P·b (b bytes per parameter in the run's dtype);
- gradients: T·b for the T trainable parameters (all of them, or LoRA's);
- optimizer state: AdamW 2·T·b (two moments), RMSprop T·b (the squared average);
- reference: a frozen copy of the weights, P·b ("copy"; the sentiment experiment always holds π_ref beside its
  policies), or nothing (precomputed, adapter);
- activations of one micro-batch kept for the backward pass, per layer and token, after Korthikanti et al.
  (2022), "Reducing activation recomputation": (17h + 4i [+ 2i gated MLP]) half-precision bytes plus 5·a·s for the
  attention scores, scaled by b/2; with gradient checkpointing only each layer's input, h·b, plus one layer in full;
- the output layer: the readable path's logits at every position (N·V·4 bytes, twice: logits and their gradient),
  or the fast paths' scored positions only (dpolab.fast).

They are estimates: allocator slack, the CUDA context (about 0.5 GB), the CPU process itself (about 0.4 GB of
Python, torch and transformers) and temporaries are not in them. ``benchmarks/plan_vs_measured.py`` compares them
with measured peaks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

GB = 1e9
KNOWN_ARCHITECTURES = {
    "openai-community/gpt2": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    "openai-community/gpt2-large": ("gpt2", dict(n_embd=1280, n_layer=36, n_head=20, vocab_size=50257,
                                                 n_positions=1024)),
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llama", dict(hidden_size=576, intermediate_size=1536,
                                                          num_hidden_layers=30, num_attention_heads=9,
                                                          num_key_value_heads=3, vocab_size=49152,
                                                          tie_word_embeddings=True)),
    "meta-llama/Llama-2-7b-hf": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                               tie_word_embeddings=False)),
}
"""Architectures of models a plan may name without the hub (their published config.json values)."""
KNOWN_ARCHITECTURES["gpt2"] = KNOWN_ARCHITECTURES["openai-community/gpt2"]
KNOWN_ARCHITECTURES["gpt2-large"] = KNOWN_ARCHITECTURES["openai-community/gpt2-large"]
KNOWN_ARCHITECTURES["smollm2-135m-instruct"] = KNOWN_ARCHITECTURES["HuggingFaceTB/SmolLM2-135M-Instruct"]


@dataclass
class Stage:
    """The memory of one stage at its peak, in bytes, by part."""

    name: str
    parts: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Plan:
    """What :func:`plan_config` found: the model, its parameter counts, and each stage's memory."""

    config_path: str
    kind: str
    model: str
    architecture_source: str
    parameters: int
    trainable: int
    dtype: str
    stages: list[Stage]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> Stage:
        return max(self.stages, key=lambda s: s.total)


def model_config(name: str):
    """``(transformers config, where it came from)`` for a config's ``model`` field, without loading weights."""
    from transformers import AutoConfig, GPT2Config, LlamaConfig

    from dpolab.models import DEFAULT_MODEL, TINY_MODELS, hub_reachable

    if name in TINY_MODELS:
        from dpolab.models.tiny import tiny_causal_lm

        return tiny_causal_lm(TINY_MODELS[name])[0].config, "dpolab.models.tiny"
    if name == DEFAULT_MODEL:
        from dpolab.data.cache import cache_dir

        folder = cache_dir() / "models" / "SmolLM2-135M-Instruct"
        if (folder / "config.json").is_file():
            return AutoConfig.from_pretrained(folder), str(folder)
    elif Path(name).expanduser().is_dir():
        return AutoConfig.from_pretrained(name), name
    else:
        try:
            return AutoConfig.from_pretrained(name, local_files_only=not hub_reachable()), f"hub/cache: {name}"
        except (OSError, ValueError):
            pass
    if name in KNOWN_ARCHITECTURES:
        family, values = KNOWN_ARCHITECTURES[name]
        return (GPT2Config if family == "gpt2" else LlamaConfig)(**values), "dpolab.cli.plan.KNOWN_ARCHITECTURES"
    raise ValueError(f"model {name!r}: no config.json here (not a folder, not in the HF cache, hub unreachable) and "
                     f"not among the known architectures {sorted(KNOWN_ARCHITECTURES)}")


def count_parameters(config, lora_r: int = 0) -> tuple[int, int]:
    """``(all parameters, trainable ones)``: the model built on the meta device (tied weights counted once); with
    LoRA, r·(in + out) per adapted linear layer (all-linear: every ``nn.Linear`` but the output layer)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    if not lora_r:
        return total, total
    head = model.get_output_embeddings()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    conv1d = [m for m in model.modules() if type(m).__name__ == "Conv1D"]  # GPT-2's linear layers
    adapter = sum(lora_r * (m.in_features + m.out_features) for m in linears)
    adapter += sum(lora_r * sum(m.weight.shape) for m in conv1d)
    return total, adapter


def _dims(config) -> dict:
    get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)  # noqa: E731
    h = get("hidden_size", "n_embd")
    return {"h": h, "layers": get("num_hidden_layers", "n_layer"), "heads": get("num_attention_heads", "n_head"),
            "kv_heads": getattr(config, "num_key_value_heads", None) or get("num_attention_heads", "n_head"),
            "i": getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h,
            "gated": getattr(config, "model_type", "") in ("llama", "mistral", "qwen2", "gemma"),
            "vocab": get("vocab_size")}


def activation_bytes(dims: dict, rows: int, seq: int, b: int, checkpointing: bool = False) -> float:
    """Activations kept for the backward pass by ``rows`` sequences of ``seq`` tokens (module docstring)."""
    h, i, a = dims["h"], dims["i"], dims["heads"]
    per_token_layer = (17 * h + 4 * i + (2 * i if dims["gated"] else 0) + 5 * a * seq) * b / 2
    tokens = rows * seq
    if checkpointing:
        return tokens * (dims["layers"] * h * b + per_token_layer)
    return tokens * dims["layers"] * per_token_layer


def training_stage(name: str, dims: dict, P: int, T: int, b: int, *, optimizer: str, reference_copies: int,
                   rows: int, seq: int, scored: int, fast: bool, checkpointing: bool = False,
                   extra: dict | None = None) -> Stage:
    """One training stage's peak: weights, gradients, optimizer, reference copies, activations, output layer."""
    logits_rows = scored if fast else rows * seq
    parts = {"weights": P * b, "gradients": T * b, "optimizer state": T * b * (2 if optimizer.startswith("adamw") else 1),
             "reference": reference_copies * P * b,
             "activations (one micro-batch)": activation_bytes(dims, rows, seq, b, checkpointing),
             "output layer (one micro-batch)": logits_rows * dims["vocab"] * 4 * (1 if fast else 2)}
    parts.update(extra or {})
    return Stage(name, parts, f"{rows} rows x {seq} tokens per micro-batch")


def plan_config(path: str | Path, overrides=(), *, fast: bool = True) -> Plan:
    """The plan of a YAML config of ``dpolab train`` (TrainConfig) or ``dpolab reproduce`` (SentimentConfig)."""
    from dpolab.experiments.sentiment.config import OPTIMS, SentimentConfig
    from dpolab.train.config import TrainConfig
    from dpolab.train.overrides import read_yaml

    keys = set(read_yaml(Path(path))) if path else set()
    sentiment_fields = set(SentimentConfig.__dataclass_fields__)
    if keys and keys <= sentiment_fields and not keys <= set(TrainConfig.__dataclass_fields__):
        c = SentimentConfig.load(path, overrides)
        config, source = model_config(c.model)
        dims = _dims(config)
        P, T = count_parameters(config)
        b, seq = 4, c.max_prefix_tokens + c.max_new_tokens
        micro = min(8, c.batch_size)
        stages = [training_stage("DPO (π_ref held, reference log-probs precomputed)", dims, P, T, b,
                                 optimizer=OPTIMS[c.optim], reference_copies=1, rows=2 * micro, seq=seq,
                                 scored=2 * micro * c.max_new_tokens, fast=fast)]
        rows = 128  # the fast sampler's default batch of rows
        kv = 2 * dims["layers"] * dims["kv_heads"] * (dims["h"] // dims["heads"]) * seq * rows * b
        stages.append(Stage("sampling (policy and π_ref, KV cache)", {"weights": 2 * P * b, "KV cache": kv},
                            f"{rows} rows x {seq} tokens"))
        if {"ppo", "ppo_rm", "rloo_rm", "online_dpo_rm", "reward_model"} & set(c.methods):
            ppo_rows = c.ppo_prompts_per_step * c.ppo_k
            rm = P * b if {"ppo_rm", "rloo_rm", "online_dpo_rm"} & set(c.methods) else 0
            stages.append(training_stage("PPO (policy, value head, π_ref, learned reward model)", dims, P, T, b,
                                         optimizer="adamw", reference_copies=1, rows=ppo_rows, seq=seq, scored=0,
                                         fast=False, extra={"reward model": rm}))
        return Plan(str(path), "reproduce", c.model, source, P, T, "fp32", stages,
                    [f"micro-batch {micro} pairs (accumulated to batch {c.batch_size}); optimizer {c.optim}"])
    c = TrainConfig.load(path, overrides)
    config, source = model_config(c.model)
    dims = _dims(config)
    P, T = count_parameters(config, c.lora_r)
    b = 2 if c.dtype in ("bf16", "bfloat16", "fp16", "float16") else 4
    reference_copies = 1 if c.reference == "copy" and c.stage == "dpo" else 0
    rows = c.micro_batch_size * (2 if c.stage in ("dpo", "reward") else 1)
    scored = rows * (c.max_length - c.max_prompt_length)
    stage = training_stage(f"{c.stage} training", dims, P, T, b, optimizer=c.optimizer,
                           reference_copies=reference_copies, rows=rows, seq=c.max_length, scored=scored, fast=fast,
                           checkpointing=c.gradient_checkpointing)
    return Plan(str(path), "train", c.model, source, P, T, c.dtype, [stage],
                [f"reference {c.reference}; lora_r {c.lora_r}; gradient_checkpointing {c.gradient_checkpointing}"])


def parse_memory(text: str) -> float:
    """``"80GB"``, ``"24GiB"``, ``"512MB"`` or a number of bytes -> bytes."""
    match = re.fullmatch(r"\s*([\d.]+(?:e\d+)?)\s*(gib|gb|mib|mb|g|m)?\s*", text.lower())
    if not match:
        raise ValueError(f"device memory {text!r}: expected e.g. 80GB, 24GiB or 512MB")
    scale = {"gib": 2 ** 30, "gb": GB, "g": GB, "mib": 2 ** 20, "mb": 1e6, "m": 1e6, None: 1}[match.group(2)]
    return float(match.group(1)) * scale


def report(plan: Plan, device_memory: float | None = None) -> str:
    """The plan as a readable table (GB = 10^9 bytes), and whether its peak fits ``device_memory``."""
    lines = [f"plan for {plan.config_path} (dpolab {plan.kind}); estimates, not measurements",
             f"model {plan.model} ({plan.architecture_source}): {plan.parameters / 1e6:,.1f} M parameters, "
             f"{plan.trainable / 1e6:,.1f} M trainable, {plan.dtype}"]
    lines += [f"  {note}" for note in plan.notes]
    for stage in plan.stages:
        lines.append(f"{stage.name} — {stage.note}")
        for part, value in stage.parts.items():
            lines.append(f"  {part:<34}{value / GB:>10.2f} GB")
        lines.append(f"  {'total':<34}{stage.total / GB:>10.2f} GB")
    peak = plan.peak
    if device_memory is None:
        lines.append(f"peak: {peak.total / GB:.2f} GB ({peak.name}); give --device-memory to check a device")
    else:
        fits = peak.total <= device_memory
        lines.append(f"peak: {peak.total / GB:.2f} GB ({peak.name}) {'fits' if fits else 'does NOT fit'} in "
                     f"{device_memory / GB:.1f} GB" + ("" if fits else ": lower micro-batch or max lengths, use "
                     "gradient_checkpointing, bf16 dtype or LoRA"))
    return "\n".join(lines)


def default_device_memory() -> float | None:
    """The memory of CUDA device 0, when there is one."""
    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None
