"""The preference-loss family: one pure function per loss, registered by name in :data:`LOSSES`.

Every registered loss takes the four per-sequence log-prob tensors (B,) and keyword parameters::

    fn(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
       beta=0.1, *, chosen_lengths=None, rejected_lengths=None, **its_own_params)
        -> (losses, chosen_rewards, rejected_rewards)      # all (B,), rewards detached

Log-probs are summed over the response tokens (:func:`dpolab.logprobs.concatenated_forward` with
``average=False``). The *log-ratio* of a response is log π_θ(y|x) − log π_ref(y|x), its implicit reward is
r̂(x, y) = β · log-ratio (paper eq. 5), and the losses are per pair; the trainer averages them over the global
batch. Every name of trl 1.16's ``loss_type`` (:data:`TRL_LOSS_TYPES`) is registered with trl's formula; the kit's
own variants have names trl does not use (``ipo_sum``, ``sft_per_sequence``, ``simpo``, ``reference_free``,
``unlikelihood``).

Modules, by concept: :mod:`~dpolab.losses.margin` (functions of the reward margin, the f-DPO family),
:mod:`~dpolab.losses.per_response` (each side's reward on its own), :mod:`~dpolab.losses.sorted_pairs` (AOT),
:mod:`~dpolab.losses.likelihood` (SFT, Unlikelihood), :mod:`~dpolab.losses.reference_free`,
:mod:`~dpolab.losses.combine` (weighted sums, WPO, LD-DPO).
"""

from dpolab.losses.registry import (  # noqa: I001 (the registry first; the modules below fill it)
    F_DIVERGENCE_LOSSES, F_DIVERGENCES, LOSS_SPECS, LOSSES, TRL_LOSS_TYPES, LossOutput, LossSpec, f_divergence_scores,
    get_loss, loss_parameters, needs_reference, register)
from dpolab.losses.margin import (dpo_loss, discopop_loss, exo_pair_loss, hinge_loss, ipo_loss, ipo_sum_loss,
                                  robust_dpo_loss, sigmoid_norm_loss)
from dpolab.losses.per_response import apo_down_loss, apo_zero_loss, bco_pair_loss, nca_pair_loss, sppo_hard_loss
from dpolab.losses.sorted_pairs import aot_loss, aot_partners, aot_sorted_values, aot_unpaired_loss
from dpolab.losses.likelihood import sft_loss, sft_per_sequence_loss, sft_token_loss, unlikelihood_pair_loss
from dpolab.losses.reference_free import reference_free_loss, simpo_loss
from dpolab.losses.combine import combined_loss, length_desensitised_logps, wpo_weights

SORTED_LOSSES = ("aot", "aot_unpaired")
"""Losses that couple the pairs of a batch (they sort); exact accumulation passes them global partners."""

__all__ = [
    "F_DIVERGENCES", "F_DIVERGENCE_LOSSES", "LOSSES", "LOSS_SPECS", "LossOutput", "LossSpec", "SORTED_LOSSES",
    "TRL_LOSS_TYPES", "aot_loss", "aot_partners", "aot_sorted_values", "aot_unpaired_loss", "apo_down_loss",
    "apo_zero_loss", "bco_pair_loss", "combined_loss", "discopop_loss", "dpo_loss", "exo_pair_loss",
    "f_divergence_scores", "get_loss", "hinge_loss", "ipo_loss", "ipo_sum_loss", "length_desensitised_logps",
    "loss_parameters", "nca_pair_loss", "needs_reference", "reference_free_loss", "register", "robust_dpo_loss",
    "sft_loss", "sft_per_sequence_loss", "sft_token_loss", "sigmoid_norm_loss", "simpo_loss", "sppo_hard_loss",
    "unlikelihood_pair_loss", "wpo_weights",
]
