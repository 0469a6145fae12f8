"""Parity with trl 1.16's DPOTrainer on one fixed batch of a tiny GPT-2 (vocabulary 512, float32, bf16=False).

trl tokenizes and collates the pairs; both sides then score the same token batch. trl's per-sequence
log-probs come from ``DPOTrainer.compute_ref_log_probs`` (its fused LM head, summed over the completion mask)
and its loss from ``DPOTrainer.compute_loss`` (the batch mean). The policy and the reference are different
random models, so the loss is not the trivial log 2.
"""

import pytest
import torch

from dpolab.data.batch import PairBatch
from dpolab.fast.paths import FastPaths
from dpolab.logprobs import concatenated_forward
from dpolab.losses import TRL_LOSS_TYPES, combined_loss
from dpolab.models.tiny import tiny_causal_lm
from dpolab.rewards import pair_metrics

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

PAIRS = {
    "prompt": ["The movie was", "Hello! How are you", "It is", "My name is Ada and"],
    "chosen": [" a delight from start to finish.", " fine, thank you.", " superb", " I live by the sea."],
    "rejected": [" dull.", " terrible", " a mess: too long and too loud.", " awful"],
}
BETA = 0.1


@pytest.fixture(scope="module")
def trainer_and_batch(tmp_path_factory):
    policy, tokenizer = tiny_causal_lm("gpt2", seed=0)
    reference, _ = tiny_causal_lm("gpt2", seed=1)
    args = trl.DPOConfig(
        output_dir=str(tmp_path_factory.mktemp("trl")),
        bf16=False,
        beta=BETA,
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        max_length=None,
        save_strategy="no",
    )
    trainer = trl.DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=datasets.Dataset.from_dict(PAIRS),
        processing_class=tokenizer,
    )
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    batch = PairBatch(inputs["input_ids"], inputs["attention_mask"], labels, index=torch.arange(4))
    return trainer, inputs, batch


def test_per_sequence_logps_match_trl(trainer_and_batch):
    trainer, inputs, batch = trainer_and_batch
    for model in (trainer.model, trainer.ref_model):
        trl_chosen, trl_rejected = trainer.compute_ref_log_probs(model, inputs)
        with torch.no_grad():
            ours = concatenated_forward(model, batch)
            slow = concatenated_forward(model, batch, fast=FastPaths.off())
        for got in (ours, slow):
            torch.testing.assert_close(got.chosen, trl_chosen, atol=1e-5, rtol=0)
            torch.testing.assert_close(got.rejected, trl_rejected, atol=1e-5, rtol=0)


SMOOTHED = ("robust", "exo_pair", "aot", "aot_unpaired")  # the losses that read trl's label_smoothing


def _cases():
    cases = [([name], None, "reverse_kl") for name in TRL_LOSS_TYPES]
    cases += [(["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], "reverse_kl"),  # MPO
              (["sigmoid"], None, "js_divergence"), (["ipo", "sft"], [1.0, 0.5], "forward_kl"),
              (["robust"], None, "alpha_divergence")]
    return cases


@pytest.mark.parametrize(("loss_type", "loss_weights", "f_divergence_type"), _cases(),
                         ids=lambda v: "+".join(v) if isinstance(v, list) and isinstance(v[0], str) else str(v))
def test_loss_matches_trl(trainer_and_batch, loss_type, loss_weights, f_divergence_type):
    """Every trl ``loss_type`` (and MPO, and f-divergences) on the same token batch: trl's compute_loss against
    the kit's :func:`combined_loss` of the per-sequence log-probs, averaged over the pairs."""
    trainer, inputs, batch = trainer_and_batch
    label_smoothing = 0.1 if set(loss_type) & set(SMOOTHED) else 0.0
    trainer.loss_types, trainer.loss_weights = loss_type, loss_weights or [1.0] * len(loss_type)
    trainer.label_smoothing, trainer.f_divergence_type, trainer.f_alpha_divergence_coef = (label_smoothing,
                                                                                            f_divergence_type, 0.5)
    with torch.no_grad():
        trl_value = trainer.compute_loss(trainer.model, inputs)
        policy = concatenated_forward(trainer.model, batch)
        reference = concatenated_forward(trainer.ref_model, batch)
    params = {"label_smoothing": label_smoothing} if label_smoothing else {}
    losses, chosen_rewards, rejected_rewards = combined_loss(
        policy.chosen,
        policy.rejected,
        reference.chosen,
        reference.rejected,
        BETA,
        loss_type=loss_type,
        loss_weights=loss_weights,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=0.5,
        chosen_lengths=policy.chosen_lengths,
        rejected_lengths=policy.rejected_lengths,
        **params,
    )
    # float32 log-probs agree to ~1e-5; squared losses (ipo, sppo_hard) scale that error with their size
    assert abs(trl_value.item() - losses.mean().item()) < 1e-5 * max(1.0, abs(trl_value.item()))
    assert (chosen_rewards - rejected_rewards).abs().max() > 0.05  # π ≠ π_ref: not the trivial point of zero margins
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items() if k.startswith("rewards/")}
    ours_metrics = pair_metrics(chosen_rewards, rejected_rewards)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert ours_metrics[key] == pytest.approx(logged[key], abs=1e-6)


@pytest.mark.parametrize(("fields", "loss_type"), [
    ({"ld_alpha": 0.5}, ["sigmoid", "sft"]),
    ({"use_weighting": True}, ["sigmoid", "bco_pair"]),
    ({"use_weighting": True, "ld_alpha": 0.3}, ["ipo"]),
], ids=["ld_alpha", "wpo", "wpo-ld-ipo"])
def test_wpo_and_ld_dpo_match_trl_end_to_end(tmp_path, fields, loss_type):
    """trl's DPOTrainer built with use_weighting / ld_alpha against the kit's batch_objective on the same tokens.

    (trl 1.16 cannot run WPO with its ``sft`` term: it multiplies the expanded batch scalar in place, which torch
    refuses; the kit computes what that code states, the token-mean NLL times the mean weight, tested against the
    restatement in tests/test_losses_trl.py.)"""
    from dpolab.train.objective import Objective, batch_objective
    from dpolab.train.reference import FrozenReference

    policy, tokenizer = tiny_causal_lm("gpt2", seed=0)
    reference, _ = tiny_causal_lm("gpt2", seed=1)
    args = trl.DPOConfig(output_dir=str(tmp_path), bf16=False, beta=BETA, per_device_train_batch_size=4,
                         report_to="none", use_cpu=True, max_length=None, save_strategy="no", loss_type=loss_type,
                         **fields)
    trainer = trl.DPOTrainer(model=policy, ref_model=reference, args=args,
                             train_dataset=datasets.Dataset.from_dict(PAIRS), processing_class=tokenizer)
    inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    batch = PairBatch(inputs["input_ids"], inputs["attention_mask"], labels, index=torch.arange(4))
    with torch.no_grad():
        trl_value = trainer.compute_loss(trainer.model, inputs)
        objective = Objective(losses=tuple(loss_type), beta=BETA, **fields)
        losses, _ = batch_objective(trainer.model, FrozenReference(trainer.ref_model), batch, objective)
    assert abs(trl_value.item() - losses.mean().item()) < 1e-5 * max(1.0, abs(trl_value.item()))
