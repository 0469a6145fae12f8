"""Checks of the objective's config fields: ``loss`` and ``loss_params`` (against the loss registry and the loss's
own signature), and those that trl names (``loss_type``, ``loss_weights``, ``use_weighting``, ``ld_alpha``,
``f_divergence_type``, ``f_alpha_divergence_coef``, ``sync_ref_model``, ``ref_model_mixup_alpha``,
``ref_model_sync_steps``), run by :meth:`dpolab.train.config.TrainConfig.validate` after the types are checked.

Each error names the field and what would fix it. Where trl refuses a combination, so does the kit (an
f-divergence with a loss that is not a function of the reward margin, WPO with AOT, TR-DPO without a reference
model of its own); one refusal is the kit's own: TR-DPO's reference is not saved in checkpoints, so such a run
cannot be resumed.
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Mapping
from typing import Any

from dpolab.train.overrides import ConfigError

# Arguments the trainer passes to every loss itself; loss_params cannot set them.
TRAINER_ARGS = frozenset({"policy_chosen_logps", "policy_rejected_logps", "ref_chosen_logps", "ref_rejected_logps",
                          "beta", "chosen_lengths", "rejected_lengths"})


def check_loss_fields(config) -> None:
    """Raise :class:`ConfigError` for a bad value or combination of the loss fields of ``config`` (a TrainConfig)."""
    from dpolab.losses import F_DIVERGENCE_LOSSES, LOSSES, SORTED_LOSSES, loss_parameters, needs_reference

    for item in config.loss_type:
        if not isinstance(item, str) or item not in LOSSES:
            raise ConfigError(f"config field 'loss_type': {item!r} is not one of {sorted(LOSSES)}")
    for w in config.loss_weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            raise ConfigError(f"config field 'loss_weights': {w!r} is not a finite number")
    if config.loss_weights and len(config.loss_weights) != len(config.loss_type):
        raise ConfigError(f"config field 'loss_weights' has {len(config.loss_weights)} entries for the "
                          f"{len(config.loss_type)} losses of 'loss_type' {config.loss_type}: give one weight per loss")
    if config.loss_type and config.loss != "sigmoid" and config.loss_type != [config.loss]:
        raise ConfigError(f"config fields 'loss' ({config.loss!r}) and 'loss_type' ({config.loss_type}) both name the "
                          "loss: set one of them")
    if config.ld_alpha is not None and not 0.0 <= config.ld_alpha <= 1.0:
        raise ConfigError(f"config field 'ld_alpha' must be in [0, 1] or null, got {config.ld_alpha}")
    if not 0.0 <= config.ref_model_mixup_alpha <= 1.0:
        raise ConfigError(f"config field 'ref_model_mixup_alpha' must be in [0, 1], got {config.ref_model_mixup_alpha}")
    if config.ref_model_sync_steps <= 0:
        raise ConfigError(f"config field 'ref_model_sync_steps' must be > 0, got {config.ref_model_sync_steps}")
    if config.stage != "dpo":
        return
    names = config.loss_type or [config.loss]
    if config.f_divergence_type != "reverse_kl":
        other = [n for n in names if n not in F_DIVERGENCE_LOSSES]
        if other:
            raise ConfigError(f"config field 'f_divergence_type' is {config.f_divergence_type!r}, defined only for the "
                              f"losses {sorted(F_DIVERGENCE_LOSSES)}, not {other}")
    if config.use_weighting and set(names) & set(SORTED_LOSSES):
        raise ConfigError("config field 'use_weighting' (WPO) does not combine with aot/aot_unpaired (they sort the "
                          "pairs, so per-pair weights would not stay with their pairs)")
    if len(set(names) & set(SORTED_LOSSES)) > 1:
        raise ConfigError(f"config field 'loss_type': at most one of {list(SORTED_LOSSES)}")
    if config.ld_alpha is not None and config.reference == "precomputed":
        raise ConfigError("config field 'ld_alpha' needs per-token reference log-probs; reference 'precomputed' holds "
                          "sums only (use 'copy' or 'adapter')")
    if config.sync_ref_model:
        if config.reference != "copy":
            raise ConfigError(f"config field 'sync_ref_model' (TR-DPO) updates a reference model of its own: set "
                              f"reference 'copy', not {config.reference!r}")
        if config.fsdp:
            raise ConfigError("config field 'sync_ref_model' (TR-DPO) is not supported with fsdp")
        if config.lora_r:
            raise ConfigError("config field 'sync_ref_model' (TR-DPO) mixes full weights into the reference copy; with "
                              "lora_r > 0 the policy's weights do not match it (trl refuses PEFT here too)")
        if config.resume_from:
            raise ConfigError("config field 'sync_ref_model' (TR-DPO): the synchronised reference is not saved in "
                              "checkpoints, so the run cannot be resumed (resume_from must be empty)")
    if not config.loss_type:  # the single loss of 'loss'
        if config.loss not in LOSSES:
            raise ConfigError(f"config field 'loss': {config.loss!r} is not one of {sorted(LOSSES)}")
        if config.reference == "none" and needs_reference(config.loss):
            raise ConfigError(f"config field 'reference' is 'none' but loss {config.loss!r} needs reference "
                              "log-probs (use 'copy', 'adapter' or 'precomputed', or a reference-free loss)")
        check_loss_params(config.loss, config.loss_params, config.beta)
        return
    if config.reference == "none":
        needing = [n for n in names if needs_reference(n)]
        if needing:
            raise ConfigError(f"config field 'reference' is 'none' but the losses {needing} need reference log-probs")
    params = config.loss_params
    unused = [k for k in params if not any(k in loss_parameters(n) for n in names)]
    if unused:
        raise ConfigError(f"config field 'loss_params': no loss of 'loss_type' {names} takes {unused}")
    for name in dict.fromkeys(names):
        check_loss_params(name, {k: v for k, v in params.items() if k in loss_parameters(name)}, config.beta)


def check_loss_params(loss: str, params: Mapping[str, Any], beta: float = 0.1) -> None:
    """Check ``loss_params`` against the loss's signature, then call the loss once on a one-pair batch so
    that its own range checks (e.g. label_smoothing in [0, 0.5)) run at load time, not at step 1."""
    import torch

    from dpolab.losses import LOSSES

    fn = LOSSES[loss]
    accepted = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    for name in params:
        if name in TRAINER_ARGS:
            raise ConfigError(f"config field 'loss_params': {name!r} is set by the trainer, not by loss_params"
                              + (" (use the config field 'beta')" if name == "beta" else ""))
        if name not in accepted and not takes_any:
            own = sorted(n for n in accepted if n not in TRAINER_ARGS)
            close = difflib.get_close_matches(name, own, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"config field 'loss_params': loss {loss!r} has no parameter {name!r}{hint}; its "
                              f"parameters: {own or 'none'}")
    if not params:
        return
    one = torch.ones(1)

    def call(**kwargs):
        fn(-one, -one, -one, -one, beta=beta, chosen_lengths=one, rejected_lengths=one, **kwargs)

    try:
        call(**params)
    except (ValueError, TypeError) as err:
        try:
            call()  # a loss that cannot run on this stand-in batch at all: leave the values to step 1
        except Exception:
            return
        raise ConfigError(f"config field 'loss_params' {dict(params)!r} of loss {loss!r}: {err}") from err
