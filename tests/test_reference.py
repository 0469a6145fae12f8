"""Reference strategies: frozen copy, LoRA adapter off, precomputed log-probs keyed by a hash of their inputs."""

import copy
import dataclasses
import sys
from pathlib import Path

import pytest
import torch

import dpolab.train.reference_table as reference_module
from dpolab.data.batch import collate_pairs, pair_length
from dpolab.data.prepare import prepare_pairs
from dpolab.data.tokenize import TokenizeConfig
from dpolab.fast.paths import pair_layout
from dpolab.logprobs import concatenated_forward
from dpolab.models.lora import add_lora
from dpolab.models.tiny import tiny_causal_lm
from dpolab.train.reference import AdapterReference, make_reference
from dpolab.train.reference_table import precompute_reference, reference_key
from dpolab.train.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from tiny_runs import FAST, make_examples  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny():
    model, tok = tiny_causal_lm("gpt2", seed=0)
    pairs = prepare_pairs(make_examples(6), tok, TokenizeConfig(max_length=64)).pairs
    return model.eval(), tok, pairs


def _logps(model, tok, pairs):
    batch = collate_pairs(pairs, tok.pad_token_id, index=list(range(len(pairs))))
    with torch.no_grad():
        return batch, concatenated_forward(model, batch)


def _perturb(model, scale=0.05):
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))


def test_frozen_copy_is_in_eval_mode_without_grad_and_ignores_policy_updates(tiny):
    model, tok, pairs = tiny
    batch, before = _logps(model, tok, pairs)
    ref = make_reference("copy", model)
    assert not ref.model.training and not any(p.requires_grad for p in ref.model.parameters())
    _perturb(model)  # the policy trains; the copy must not move
    got = ref.pair_logps(batch)
    assert torch.equal(got.chosen, before.chosen) and torch.equal(got.rejected, before.rejected)
    assert not got.chosen.requires_grad
    assert not torch.allclose(_logps(model, tok, pairs)[1].chosen, before.chosen)


def test_adapter_reference_is_the_base_model_and_restores_the_mode(tiny):
    model, tok, pairs = tiny
    base = copy.deepcopy(model)
    policy = add_lora(model, 4, 8.0)
    with torch.no_grad():  # a trained adapter: lora_B != 0, so the policy differs from its base
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    batch, want = _logps(base, tok, pairs)
    policy.train()
    got = AdapterReference(policy).pair_logps(batch)
    assert policy.training  # mode restored after the reference forward
    torch.testing.assert_close(got.chosen, want.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected, want.rejected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logps(policy.eval(), tok, pairs)[1].chosen, want.chosen, atol=1e-3)
    with pytest.raises(ValueError, match="needs a peft model"):
        AdapterReference(base)


def test_precomputed_table_equals_the_model_and_is_reused(tiny, tmp_path, monkeypatch):
    model, tok, pairs = tiny
    calls = []
    forward = reference_module.concatenated_forward
    monkeypatch.setattr(reference_module, "concatenated_forward",
                        lambda m, b, **k: calls.append(b.index.tolist()) or forward(m, b, **k))
    table = precompute_reference(model, tok, pairs, batch_size=4, root=tmp_path)
    assert len(calls) == 2  # 6 pairs in batches of 4
    widths = [pair_length(pairs[i], pair_layout(model)) for i in calls[0] + calls[1]]  # taken narrowest first
    assert sorted(calls[0] + calls[1]) == list(range(6)) and widths == sorted(widths) and len(set(widths)) > 1
    batch, want = _logps(model, tok, pairs)
    got = table.pair_logps(batch)
    torch.testing.assert_close(got.chosen, want.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected, want.rejected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.chosen_lengths, want.chosen_lengths)
    again = precompute_reference(model, tok, pairs, batch_size=4, root=tmp_path)
    assert len(calls) == 2 and again.folder == table.folder and torch.equal(again.chosen, table.chosen)
    # the batch size changes the rounding, so it is part of the key (issue 20): a new table
    assert precompute_reference(model, tok, pairs, batch_size=2, root=tmp_path).folder != table.folder
    shuffled = collate_pairs([pairs[5], pairs[0]], tok.pad_token_id, index=[5, 0])  # looked up by dataset index
    assert torch.equal(table.pair_logps(shuffled).chosen, table.chosen[[5, 0]])
    with pytest.raises(IndexError, match="outside the precomputed table of 6 pairs"):
        table.pair_logps(collate_pairs(pairs[:1], tok.pad_token_id, index=[6]))


def test_any_changed_input_gives_a_new_key(tiny):
    model, tok, pairs = tiny
    settings = TokenizeConfig(max_length=64)
    key = reference_key(model, tok, pairs, settings)
    assert reference_key(model, tok, pairs, settings) == key  # stable
    changed_data = [dataclasses.replace(pairs[0], chosen_ids=pairs[0].chosen_ids[:-1] + [7],
                                        chosen_mask=pairs[0].chosen_mask)] + pairs[1:]
    changed_tok = copy.deepcopy(tok)
    changed_tok.chat_template = "{{ messages }}"
    changed_model = copy.deepcopy(model)
    with torch.no_grad():
        changed_model.transformer.h[1].mlp.c_fc.bias[3] += 1e-6  # one weight, barely
    keys = {
        "data": reference_key(model, tok, changed_data, settings),
        "settings": reference_key(model, tok, pairs, dataclasses.replace(settings, max_length=65)),
        "tokenizer": reference_key(model, changed_tok, pairs, settings),
        "weights": reference_key(changed_model, tok, pairs, settings),
    }
    assert len(set(keys.values()) | {key}) == 5, keys


def test_beta_sweep_reuses_the_precomputed_reference_and_matches_the_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path / "cache"))
    calls = []
    forward = reference_module.concatenated_forward
    monkeypatch.setattr(reference_module, "concatenated_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    run = {**FAST, "max_steps": 3, "micro_batch_size": 4, "grad_accum_steps": 1, "eval_batch_size": 4, "kl_samples": 2,
           "kl_max_new_tokens": 4}
    data = {"train_pairs": make_examples(12), "eval_pairs": make_examples(4, offset=40)}
    sweep = [train({**run, "beta": beta, "reference": "precomputed", "output_dir": str(tmp_path / f"b{beta}")}, **data)
             for beta in (0.1, 0.5)]
    assert len(calls) == 3 + 1  # 12 training pairs in batches of 4, 4 held-out pairs: computed once for both β
    assert len(list((tmp_path / "cache" / "reference_logps").glob("*/COMPLETE"))) == 2  # train and eval tables
    copied = train({**run, "beta": 0.5, "reference": "copy", "output_dir": str(tmp_path / "copy")}, **data)
    for a, b in zip(sweep[1].history, copied.history):
        for name in ("loss", "rewards/margins", "grad_norm"):
            assert a[name] == pytest.approx(b[name], rel=1e-4, abs=1e-6), (a["step"], name)
    assert sweep[1].eval_history[0]["eval_rewards/accuracies"] == copied.eval_history[0]["eval_rewards/accuracies"]
    assert "eval_kl" not in sweep[1].eval_history[0]  # no reference model to score new samples
    assert sweep[1].eval_history[0]["eval_kl_note"].startswith("KL skipped: no reference model")


def test_lora_training_against_the_adapter_reference_leaves_the_base_weights(tmp_path):
    model, tok = tiny_causal_lm("gpt2", seed=0)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    result = train({**FAST, "max_steps": 3, "micro_batch_size": 4, "grad_accum_steps": 1, "lora_r": 4,
                    "reference": "adapter", "output_dir": str(tmp_path)}, model=model, tokenizer=tok,
                   train_pairs=make_examples(12))
    assert result.history[0]["loss"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-6)
    assert result.history[-1]["rewards/margins"] != 0.0
    merged = result.model.get_base_model().state_dict()
    for name, tensor in base.items():
        key = name.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(merged.get(key, merged.get(name)), tensor), name
    assert (result.checkpoint / "adapter_config.json").is_file()  # peft's format, where load_model finds it


def test_sampled_kl_is_zero_when_the_policy_is_its_reference(tiny):
    """y ~ π at temperature 1: log π(y|x) from the sampler (KV cache, left padding) and log π_ref(y|x) from a
    right-padded forward of an identical copy must agree per sample, so KL = 0 up to float rounding."""
    from dpolab.train.config import TrainConfig
    from dpolab.train.distributed import DistributedContext
    from dpolab.train.heldout import sample_kl

    model, tok, _ = tiny
    config = TrainConfig.load(None, {"kl_max_new_tokens": 6, "eval_batch_size": 3})
    prompts = [e.prompt for e in make_examples(5)]
    out = sample_kl(model, make_reference("copy", model), tok, prompts, config=config, ctx=DistributedContext(),
                    chat=False)
    assert abs(out["eval_kl"]) < 1e-4 and out["eval_kl_se"] < 1e-4
    assert 1 <= out["eval_sample_length"] <= 6


def test_every_strategy_is_a_reference(tiny, tmp_path):
    """The four strategies behind ``pair_logps`` satisfy the :class:`Reference` protocol that ``Run.train_ref`` is
    typed with, and give the same log-probs of the same pairs (θ_ref = the initial policy)."""
    from dpolab.train.reference import Reference

    model, tok, pairs = tiny
    batch, expected = _logps(model, tok, pairs)
    peft_policy = add_lora(copy.deepcopy(model), 4, 8.0).eval()
    strategies = {"copy": make_reference("copy", model), "adapter": make_reference("adapter", peft_policy),
                  "starting adapter": make_reference("adapter", peft_policy, adapter_start=True),
                  "precomputed": precompute_reference(model, tok, pairs, batch_size=4, root=tmp_path)}
    for name, reference in strategies.items():
        assert isinstance(reference, Reference), name
        got = reference.pair_logps(batch)
        torch.testing.assert_close(torch.cat([got.chosen, got.rejected]),
                                   torch.cat([expected.chosen, expected.rejected]), atol=1e-5, rtol=1e-5, msg=name)
