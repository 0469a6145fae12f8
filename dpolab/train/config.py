"""The training configuration: one dataclass of commented, typed fields whose defaults are a small CPU run.

A run is the defaults, then a YAML file, then ``key=value`` overrides (command line or keyword
arguments), each checked against the field's type before any work starts by the loader every config of the
kit shares (:mod:`dpolab.train.overrides`). A key that is not a field, or a value of the wrong type, stops with an
error that names the source and the key::

    config = TrainConfig.load("configs/sentiment.yaml", ["beta=0.5", "lr=1e-5"])
    config = TrainConfig.load(None, {"stage": "sft", "max_steps": 10})

The field comments (the string under each field) are the documentation: ``dpolab train --help``
prints them, so they are kept to one or two lines.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dpolab.data.device import check_device
from dpolab.train.loss_config import check_loss_fields
from dpolab.train.overrides import ConfigError, field_docs, load_config


@dataclass
class TrainConfig:
    """Everything a training run needs besides the model and the data. Defaults: a small CPU run."""

    # --- what to train -------------------------------------------------------------------------------------
    stage: Literal["sft", "dpo", "reward"] = "dpo"
    """Training stage: "sft" (NLL on the chosen responses, the paper's first stage), "dpo", or "reward" (a
    Bradley–Terry reward model on the same preference rows, the RLHF pipeline's step 2: dpolab.train.reward_stage)."""
    model: str = "smollm2-135m-instruct"
    """Policy to start from: the embedded default, a local folder, a hub id, or "tiny-gpt2"/"tiny-llama" (random)."""
    model_revision: str | None = None
    """trl's name: branch, tag or commit of a hub id `model`; null = the hub's default branch (an error for a
    folder, which holds one version)."""
    trust_remote_code: bool = False
    """trl's DPOConfig name: let transformers run Python code shipped with `model` (for architectures it lacks);
    only for repositories you trust."""
    train_data: str = ""
    """Training rows for the command line: a .jsonl/.json/.parquet/.csv/.tsv/.arrow file, a save_to_disk folder
    (folder:split), a folder of data files, or a hub id (dpolab.data.sources); the Python API also takes pairs."""
    eval_data: str = ""
    """Held-out rows for evaluation (same sources); empty = no evaluation from the command line."""
    train_split: str = "train"
    """trl's dataset_train_split: the split of a train_data source that has splits (a DatasetDict) and names none."""
    eval_split: str = "test"
    """trl's dataset_test_split: the split of an eval_data source that has splits and names none."""
    dataset_num_proc: int | None = None
    """trl's name: worker processes that validate and tokenize the data (null: this process); same pairs either way."""

    # --- loss ----------------------------------------------------------------------------------------------
    center_rewards_coefficient: float | None = None
    """trl RewardConfig's name (stage "reward"): adds c·(r(x, y_w) + r(x, y_l))² to the loss to centre the rewards."""
    loss: str = "sigmoid"
    """Name of the DPO-family loss in dpolab.losses.LOSSES (ignored when stage is "sft")."""
    beta: float = 0.1
    """β, the strength of the KL constraint to the reference (paper Eq. 3, 7)."""
    loss_params: dict = field(default_factory=dict)
    """Extra parameters of the chosen loss, e.g. {label_smoothing: 0.1}; override one as loss_params.NAME=VALUE."""
    sft_weight: float = 0.0
    """Weight of the SFT (per-token NLL on chosen) term mixed into the DPO loss: total = loss + sft_weight * sft."""
    reference: Literal["copy", "adapter", "precomputed", "none"] = "copy"
    """Reference π_ref: frozen "copy"; the policy with its LoRA "adapter" off; "precomputed" cached log-probs; "none"."""
    loss_type: list = field(default_factory=list)
    """trl's name: losses of dpolab.losses.LOSSES trained as a weighted sum, e.g. [sigmoid, bco_pair, sft] (MPO); empty
    = [loss]. loss_params go to every listed loss that takes them."""
    loss_weights: list = field(default_factory=list)
    """trl's name: one weight per loss_type entry, e.g. [0.8, 0.2, 1.0]; empty = 1 each."""
    use_weighting: bool = False
    """trl's name: WPO, weigh each pair by the policy's length-normalised probabilities of both responses (no grad)."""
    ld_alpha: float | None = None
    """trl's name: LD-DPO, weight in [0, 1] of the response tokens past the shorter response's length; null = off."""
    f_divergence_type: Literal["reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"] = "reverse_kl"
    """trl's name: the divergence to π_ref (f-DPO); other than reverse_kl only for losses of the reward margin."""
    f_alpha_divergence_coef: float = 0.5
    """trl's name: α of f_divergence_type alpha_divergence."""
    sync_ref_model: bool = False
    """trl's name: TR-DPO, every ref_model_sync_steps steps set π_ref ← α π_θ + (1 − α) π_ref (reference "copy")."""
    ref_model_mixup_alpha: float = 0.6
    """trl's name: TR-DPO's α in [0, 1]."""
    ref_model_sync_steps: int = 512
    """trl's name: TR-DPO's τ, optimizer steps between reference updates."""

    # --- parameter-efficient fine-tuning -------------------------------------------------------------------
    lora_r: int = 0
    """LoRA rank (peft); 0 trains all weights. reference="adapter" needs lora_r > 0."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (the update is scaled by lora_alpha / lora_r)."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """trl's name: modules that get an adapter, by name or suffix (e.g. [q_proj, v_proj]), or "all-linear"."""
    lora_dropout: float = 0.0
    """trl's name: dropout on the adapter's input in training steps (the model's own dropout stays off; dpolab.models.lora)."""
    lora_bias: Literal["none", "all", "lora_only"] = "none"
    """dpolab's name for peft's `bias` (not peft's lora_bias): biases that train too; other than "none", the adapter
    switched off is no longer the starting model, so reference "adapter" is refused."""
    use_rslora: bool = False
    """trl's name: rank-stabilised LoRA, the update scaled by lora_alpha / √lora_r instead of lora_alpha / lora_r."""
    use_dora: bool = False
    """trl's name: DoRA, each adapted weight as a trained magnitude times a direction (slower steps)."""
    lora_modules_to_save: list[str] = field(default_factory=list)
    """trl's name: modules trained in full beside the adapter and saved with it (π_ref keeps the originals)."""

    # --- optimisation --------------------------------------------------------------------------------------
    optimizer: Literal["adamw", "rmsprop"] = "adamw"
    """Optimiser: "adamw", or "rmsprop" (the paper's choice, §B)."""
    lr: float = 5e-5
    """Peak learning rate after warm-up (small CPU runs need far more than the paper's 1e-6)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW) or L2 penalty (RMSprop)."""
    warmup_steps: int = 2
    """Optimizer steps of linear warm-up from 0 to lr (the paper uses 150); then lr_scheduler_type."""
    warmup_ratio: float = 0.0
    """HF's name: warm-up as a share of all steps (ceil(warmup_ratio × steps)); when > 0 it replaces warmup_steps."""
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = "constant"
    """HF's name: after the warm-up keep lr "constant", or decay it towards 0 at the end of the run ("linear",
    "cosine"); dpolab.train.schedule. Unlike HF's "constant", the warm-up applies to every type (warmup_steps=0 for none)."""
    max_steps: int = 24
    """Optimizer steps to train for (each consumes one global batch); ignored when num_train_epochs > 0."""
    num_train_epochs: float = 0.0
    """HF's name: when > 0, train ceil(num_train_epochs × steps per epoch) steps instead of max_steps (steps per
    epoch = pairs // global batch; fractions allowed)."""
    micro_batch_size: int = 8
    """Pairs per forward pass on each process (8, as trl's per-device batch: one pass per step of short pairs pays;
    lower it and raise grad_accum_steps when long pairs do not fit in memory)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step; global batch = micro_batch_size × grad_accum_steps × processes."""
    max_grad_norm: float = 10.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    # --- tokenization (only used when the data arrive as text) ---------------------------------------------
    max_length: int = 128
    """Maximum prompt + response tokens."""
    max_prompt_length: int = 64
    """When prompt + response is too long, the prompt keeps its end and is never cut below this many tokens."""
    boundary: Literal["error", "repair"] = "error"
    """When tokens(prompt) is not a prefix of tokens(prompt + response): "error", or "repair" (see dpolab.data.tokenize)."""
    mask_policy: Literal["final_turn", "all_assistant"] = "final_turn"
    """Multi-turn scoring: only the final assistant turn, or every assistant turn of the response side."""
    on_truncation: Literal["drop", "error"] = "drop"
    """A pair that truncation leaves unusable (no response token, or chosen = rejected): "drop" it (counted), or "error"."""
    special_tokens: Literal["error", "allow"] = "error"
    """Data text holding a special token's literal text (e.g. "<|endoftext|>"): "error", or "allow" it as that token."""
    completion_only_loss: bool = True
    """trl's name: SFT on prompt/completion rows scores only the completion; false scores every token."""
    assistant_only_loss: bool = False
    """trl's name: SFT on `messages` rows scores only the assistant turns (all of them); false (trl's default) every token."""
    chat_template_kwargs: dict = field(default_factory=dict)
    """Extra arguments of the chat template, e.g. {enable_thinking: false}; a row's own column updates them."""
    tools: list = field(default_factory=list)
    """Tool schemas (JSON-schema dicts) passed to the chat template; a row's own `tools` column replaces them."""

    # --- run -----------------------------------------------------------------------------------------------
    seed: int = 0
    """Seed of the data order and of everything random; a CPU run is bit-for-bit repeatable."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Compute precision of forward passes ("bf16" autocast pays only on hardware with bf16 units)."""
    dtype: Literal["fp32", "bf16", "fp16", "float32", "bfloat16", "float16"] = "fp32"
    """trl's name: dtype the model named by `model` is loaded in (weights, gradients and optimizer state); separate
    from the autocast `precision`. bf16/fp16 halve the memory; fp16 has no loss scaling here (bf16 is safer)."""
    gradient_checkpointing: bool = False
    """HF's name: recompute each decoder layer's activations in the backward pass instead of keeping them (less
    memory, about one more forward of time); same loss and gradients to float rounding (dpolab.train.recompute)."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", or "cuda[:N]"; under torchrun each process uses its local GPU
    (dpolab.data.device)."""
    use_cpu: bool = False
    """HF TrainingArguments' name: true trains on the CPU even where CUDA is available (the same as device: cpu)."""
    fsdp: bool = False
    """Under torchrun, shard the model with FSDP instead of replicating it with DDP (for models that do not fit)."""
    output_dir: str = "runs/train"
    """Folder for metrics.jsonl and checkpoints/ (the last checkpoint holds the final model); checked writable first."""
    overwrite: bool = False
    """Let a fresh run replace an earlier run's files in output_dir (otherwise it refuses, to protect them)."""
    eval_every: int = 0
    """Evaluate every this many steps; 0 = only at the end (and never without eval pairs)."""
    eval_batch_size: int = 8
    """Pairs per forward pass during evaluation."""
    kl_samples: int = 8
    """Held-out prompts sampled from the policy to estimate KL(π‖π_ref); 0 skips the KL estimate."""
    kl_max_new_tokens: int = 24
    """Maximum new tokens per KL sample."""
    save_every: int = 0
    """Save a checkpoint every this many steps; 0 = only at the end."""
    keep_last: int = 2
    """Number of most recent checkpoints kept on disk (and the best one, when load_best_model_at_end or early
    stopping tracks it)."""
    metric_for_best_model: str = "eval_loss"
    """HF's name: the evaluation metric that picks the best checkpoint and drives early stopping ("eval_" is added
    to a name without it, e.g. "rewards/accuracies")."""
    greater_is_better: bool | None = None
    """HF's name: whether a larger metric_for_best_model is better; null = HF's default (lower for a name ending in
    "loss", higher for any other)."""
    load_best_model_at_end: bool = False
    """HF's name: the run returns the weights of its best checkpoint (by metric_for_best_model, kept beyond
    keep_last), and TrainResult.checkpoint names it; needs save_every a multiple of eval_every."""
    early_stopping_patience: int = 0
    """transformers' EarlyStoppingCallback name: stop after this many evaluations in a row without an improvement
    of metric_for_best_model (the last checkpoint is written first); 0 = off. Needs eval_every > 0."""
    early_stopping_threshold: float = 0.0
    """transformers' name: how much metric_for_best_model must improve to count as an improvement."""
    resume_from: str = ""
    """Checkpoint folder to resume from, "auto" for the latest in output_dir/checkpoints (refuses to start over on an
    earlier run's files without overwrite=true), or "" for a fresh run."""
    keep_freed_memory: bool = True
    """CPU runs with glibc: keep freed memory in the process during training instead of paying page faults for it
    again every step (dpolab.fast.allocator; same numbers, faster); ignored when MALLOC_* variables are set."""
    report_to: list = field(default_factory=lambda: ["jsonl"])
    """HF's name: where step and eval metrics go: "jsonl" (output_dir/metrics.jsonl, always written: resume reads
    it), "tensorboard" (output_dir/runs, extra dpolab[tensorboard]), "wandb" (extra dpolab[wandb]; WANDB_MODE=offline
    works without a network); "none" (HF's: no tracker) leaves the JSONL alone."""
    logging_steps: int = 1
    """HF's name: log one record every this many optimizer steps (and at the last), with the metrics averaged over
    those steps as trl does, except the policy's ``logits/*`` and ``entropy``, which are measured on the logged step
    only (a pass over the logits that the other steps skip); TrainResult.history keeps every step of this process."""
    progress: bool = True
    """Show a tqdm progress bar with the live loss and reward accuracy (switch off for notebooks under test)."""

    # ------------------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Mapping[str, Any] | Iterable[str] = ()) -> TrainConfig:
        """Defaults, then the YAML file at ``path``, then ``overrides`` (a dict or ``"key=value"`` strings), each
        type-checked (:func:`dpolab.train.overrides.load_config`); then :meth:`validate`."""
        config = load_config(cls, path, overrides, help_command="dpolab train --help")
        config.validate()
        return config

    def replace(self, **overrides: Any) -> TrainConfig:
        """A copy with ``overrides`` applied through the same type checks as :meth:`load`."""
        return TrainConfig.load(None, {**self.to_dict(), **overrides})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-serialisable dict of all fields."""
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Range and cross-field checks (types are checked on the way in)."""
        positive = ["max_steps", "micro_batch_size", "grad_accum_steps", "max_length", "max_prompt_length",
                    "eval_batch_size", "keep_last", "logging_steps"]
        non_negative = ["warmup_steps", "eval_every", "save_every", "kl_samples", "kl_max_new_tokens", "lora_r",
                        "max_grad_norm", "weight_decay", "sft_weight", "lr", "warmup_ratio", "num_train_epochs",
                        "early_stopping_patience", "early_stopping_threshold"]
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name!r} must be > 0, got {getattr(self, name)}")
        for f in dataclasses.fields(self):  # nan passes every comparison below, inf most of them
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"config field {f.name!r} must be a finite number, got {value}")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"config field {name!r} must be >= 0, got {getattr(self, name)}")
        for name in ("beta", "lr"):  # β ≤ 0 trains towards the rejected responses (or not at all); lr 0 trains nothing
            if getattr(self, name) <= 0:
                raise ConfigError(f"config field {name!r} must be > 0, got {getattr(self, name)}")
        if self.dataset_num_proc is not None and self.dataset_num_proc < 1:
            raise ConfigError(f"config field 'dataset_num_proc' must be >= 1 or null, got {self.dataset_num_proc}")
        if self.warmup_ratio >= 1:
            raise ConfigError(f"config field 'warmup_ratio' must be in [0, 1), got {self.warmup_ratio}")
        unknown = [t for t in self.report_to if t not in (*TRACKERS, "none")]
        if unknown:
            raise ConfigError(f"config field 'report_to': {unknown} not among {list(TRACKERS)}")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(f"config field 'max_prompt_length' ({self.max_prompt_length}) must be smaller than "
                              f"'max_length' ({self.max_length})")
        if self.reference == "adapter" and self.lora_r == 0:
            raise ConfigError("config field 'reference' is 'adapter' but 'lora_r' is 0: the adapter reference needs a "
                              "LoRA adapter to switch off (set lora_r > 0)")
        self._check_lora_fields()
        self._check_best_model_fields()
        try:
            check_device(self.device, self.use_cpu)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        check_loss_fields(self)  # loss, loss_type, loss_weights, loss_params and the other trl fields

    def _check_lora_fields(self) -> None:
        """LoRA settings only with an adapter; a dropout probability; biases trained only when π_ref is not the
        adapter switched off (that would not undo them)."""
        defaults = TrainConfig()
        unused = [n for n in LORA_FIELDS if getattr(self, n) != getattr(defaults, n)]
        if not self.lora_r and unused:
            raise ConfigError(f"config fields {unused} set LoRA options but 'lora_r' is 0 (no adapter); set lora_r > 0")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"config field 'lora_dropout' must be in [0, 1), got {self.lora_dropout}")
        if self.reference == "adapter" and self.lora_bias != "none":
            raise ConfigError(f"config field 'lora_bias' is {self.lora_bias!r} with reference 'adapter': the trained "
                              "biases stay when the adapter is switched off, so it would not be the starting model; "
                              "use reference 'copy' or 'precomputed', or lora_bias 'none'")

    def _check_best_model_fields(self) -> None:
        """HF's rules for the best checkpoint and early stopping: evaluations at every save, and during the run."""
        every = self.eval_every
        if self.load_best_model_at_end and every and (not self.save_every or self.save_every % every):
            raise ConfigError(f"load_best_model_at_end needs 'save_every' ({self.save_every}) to be a positive multiple "
                              f"of 'eval_every' ({self.eval_every}), so that every checkpoint has its evaluation")
        if self.load_best_model_at_end and self.fsdp:
            raise ConfigError("load_best_model_at_end is not supported with fsdp (the best weights would have to be "
                              "sharded again); load the best checkpoint after the run instead")
        if self.early_stopping_patience and not self.eval_every:
            raise ConfigError("early_stopping_patience needs evaluations during the run: set 'eval_every' > 0")


# The LoRA settings passed to peft beside lora_r and lora_alpha (dpolab.models.lora.add_lora).
LORA_FIELDS = ("lora_target_modules", "lora_dropout", "lora_bias", "use_rslora", "use_dora", "lora_modules_to_save")

# Where report_to can send metrics (dpolab.train.trackers).
TRACKERS = ("jsonl", "tensorboard", "wandb")


def field_help() -> dict[str, tuple[str, str, str]]:
    """``{name: (type, default, comment)}`` for every TrainConfig field, read from the comments under the fields."""
    return field_docs(TrainConfig)
