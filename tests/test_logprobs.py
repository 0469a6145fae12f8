"""Log-probs: hand values, a slow per-token loop, transformers' own loss, bf16, chunking, the scored-only path."""

import math

import pytest
import torch

import dpolab.fast.paths as paths
from dpolab.data.batch import PairBatch, SequenceBatch, collate_pairs, collate_sequences
from dpolab.data.tokenize import TokenizedPair
from dpolab.fast import label_logprob, output_layer
from dpolab.fast.paths import FastPaths, model_paths, supports_scored_logits
from dpolab.logprobs import (
    concatenated_forward,
    row_sums,
    sequence_forward,
    sequence_logprobs,
    token_logprobs,
)
from dpolab.models.tiny import tiny_causal_lm


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    model, _ = tiny_causal_lm(request.param, seed=0)
    return model


def _random_labels(generator, batch, length, vocab):
    """Labels with a prompt (first 2-4 columns), right padding, and a masked token inside one response."""
    labels = torch.randint(vocab, (batch, length), generator=generator)
    for row in range(batch):
        labels[row, : 2 + row % 3] = -100
        labels[row, length - row % 4 :] = -100
    labels[0, length - 3] = -100
    return labels


def _slow_sequence_logprobs(logits, labels, average=False):
    """One log-softmax per scored token, in float64, in a Python loop."""
    out = []
    for row in range(labels.size(0)):
        total, count = 0.0, 0
        for t in range(1, labels.size(1)):
            if labels[row, t] != -100:
                total += torch.log_softmax(logits[row, t - 1].double(), -1)[labels[row, t]].item()
                count += 1
        out.append(total / count if average else total)
    return torch.tensor(out, dtype=torch.float64)


def test_token_logprobs_hand_value():
    """logits (0, ln 2, ln 5): softmax = (1, 2, 5)/8, so log p(2) = ln(5/8) and log p(0) = ln(1/8)."""
    logits = torch.tensor([[0.0, math.log(2), math.log(5)], [0.0, math.log(2), math.log(5)], [1.0, 2.0, 3.0]])
    out = token_logprobs(logits, torch.tensor([2, 0, -100]))
    assert out.tolist() == pytest.approx([math.log(5 / 8), math.log(1 / 8), 0.0], abs=1e-6)


def test_sequence_logprobs_shift_hand_value():
    """Position t's logits score the label at t+1: with labels (-100, 2, 1), the sum is
    log p_0(2) + log p_1(1) = ln(5/8) + ln(2/8) = ln(10/64); the per-token mean halves it."""
    logits = torch.log(torch.tensor([[[1.0, 2.0, 5.0], [1.0, 2.0, 5.0], [9.0, 9.0, 9.0]]]))
    labels = torch.tensor([[-100, 2, 1]])
    assert sequence_logprobs(logits, labels).item() == pytest.approx(math.log(10 / 64), abs=1e-6)
    assert sequence_logprobs(logits, labels, average=True).item() == pytest.approx(math.log(10 / 64) / 2, abs=1e-6)


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_equals_slow_loop(average):
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 9, 37, generator=generator)
    labels = _random_labels(generator, 4, 9, 37)
    fast = sequence_logprobs(logits, labels, average=average)
    assert fast.dtype == torch.float32
    torch.testing.assert_close(fast.double(), _slow_sequence_logprobs(logits, labels, average), atol=1e-5, rtol=0)


def test_chunked_forward_and_backward_equal_unchunked(monkeypatch):
    """Chunks of 3 positions (V=37) must give the same values and gradients as one chunk."""
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 8, 37, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = _random_labels(generator, 3, 8, 37)
    whole = sequence_logprobs(logits, labels)
    (grad_whole,) = torch.autograd.grad(whole.sum(), logits)
    monkeypatch.setattr(label_logprob, "CHUNK_ELEMENTS", 3 * 37)
    chunked = sequence_logprobs(logits, labels)
    (grad_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_chunked, grad_whole, atol=1e-12, rtol=0)


def test_gradient_finite_differences_and_log_softmax_reference(monkeypatch):
    """The recomputing backward equals finite differences (gradcheck, float64) and autograd of log_softmax."""
    monkeypatch.setattr(label_logprob, "CHUNK_ELEMENTS", 2 * 11)
    generator = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 6, 11, generator=generator, dtype=torch.float64, requires_grad=True)
    labels = _random_labels(generator, 2, 6, 11)
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda z: sequence_logprobs(z, labels) * weights, (logits,))
    (ours,) = torch.autograd.grad((sequence_logprobs(logits, labels) * weights).sum(), logits)
    shifted = labels[:, 1:]
    reference = torch.log_softmax(logits[:, :-1], -1).gather(-1, shifted.clamp(min=0)[..., None]).squeeze(-1)
    reference = (reference * (shifted != -100)).sum(-1)
    (expected,) = torch.autograd.grad((reference * weights).sum(), logits)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)


def test_bf16_logits_are_scored_in_float32():
    """bf16 logits are upcast exactly, so the result equals the float32 computation on the upcast logits, while
    a log-softmax taken in bf16 is off by far more (bf16 keeps 8 significant bits)."""
    generator = torch.Generator().manual_seed(3)
    logits32 = (4 * torch.randn(2, 40, 512, generator=generator)).bfloat16().float()
    labels = _random_labels(generator, 2, 40, 512)
    logits16 = logits32.bfloat16().requires_grad_()
    ours = sequence_logprobs(logits16, labels)
    assert ours.dtype == torch.float32
    reference = sequence_logprobs(logits32, labels)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    naive = torch.log_softmax(logits32.bfloat16(), -1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0)[..., None])
    naive = (naive.squeeze(-1).float() * (labels[:, 1:] != -100)).sum(-1)
    assert (naive - reference).abs().max() > 100 * (ours - reference).abs().max().clamp(min=1e-6)
    ours.sum().backward()
    assert logits16.grad.dtype == torch.bfloat16


def test_sequence_logprobs_equals_transformers_loss(model):
    """model(..., labels=...).loss is the mean NLL over all scored tokens: −Σ log-probs / Σ lengths."""
    generator = torch.Generator().manual_seed(4)
    input_ids = torch.randint(model.config.vocab_size, (3, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        logps, lengths = sequence_forward(model, SequenceBatch(input_ids, attention_mask, labels))
    assert lengths.tolist() == [8, 5, 8]
    torch.testing.assert_close(sequence_logprobs(out.logits, labels), logps, atol=1e-5, rtol=0)
    assert (-logps.sum() / lengths.sum()).item() == pytest.approx(out.loss.item(), abs=1e-6)


def _pairs():
    return [
        TokenizedPair([5, 6, 7], [8, 9, 10, 11], [12, 13], [1, 1, 1, 1], [1, 1]),
        TokenizedPair([14, 15], [16, 17], [18, 19, 20, 21, 22], [1, 0], [1, 1, 0, 1, 1]),
        TokenizedPair([23, 24, 25, 26, 27], [28], [29, 30, 31], [1], [1, 1, 1]),
    ]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("share_prompt", [False, True])
def test_scored_path_equals_full_logits_path_values_and_gradients(model, share_prompt, fused, monkeypatch):
    """The default path computes logits only where a token is scored: Σ lengths rows on 2B rows, and one row
    fewer per pair on the pair-tree layout (the last prompt position predicts the first token of both
    responses). Unfused, the model's own output layer does it (``logits_to_keep``); fused, the model never runs
    its output layer and dpolab.fast.output_layer.OutputLayerLogProb applies the same weight to the hidden states.
    The reference (``FastPaths.off()``) computes logits at all 2B·T positions."""
    batch = collate_pairs(_pairs(), pad_token_id=0)
    assert supports_scored_logits(model)
    seen, fused_rows = [], []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    apply = output_layer.OutputLayerLogProb.apply
    monkeypatch.setattr(output_layer.OutputLayerLogProb, "apply",
                        lambda hidden, *rest: fused_rows.append(hidden.shape) or apply(hidden, *rest))
    try:
        fast = concatenated_forward(model, batch, fast=FastPaths(pair_tree=share_prompt, fused_output_layer=fused))
        slow = concatenated_forward(model, batch, fast=FastPaths.off())
    finally:
        hook.remove()
    shared_predictors = batch.num_pairs if share_prompt else 0
    scored_rows = int(fast.chosen_lengths.sum() + fast.rejected_lengths.sum()) - shared_predictors
    everywhere = torch.Size([*batch.input_ids.shape, model.config.vocab_size])
    if fused:
        assert seen == [everywhere] and fused_rows == [torch.Size([scored_rows, model.config.hidden_size])]
    else:
        assert seen == [torch.Size([scored_rows, model.config.vocab_size]), everywhere] and fused_rows == []
    grads_fast = torch.autograd.grad((fast.chosen - 2 * fast.rejected).sum(), list(model.parameters()))
    grads_slow = torch.autograd.grad((slow.chosen - 2 * slow.rejected).sum(), list(model.parameters()))
    torch.testing.assert_close(fast.chosen, slow.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.rejected, slow.rejected, atol=1e-5, rtol=0)
    for g_fast, g_slow in zip(grads_fast, grads_slow):
        torch.testing.assert_close(g_fast, g_slow, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["gpt2", "llama", "tied-llama"])
def test_output_gradient_added_into_the_weight_equals_autograds(kind, monkeypatch):
    """With ``grad_into_weight`` the fused output layer adds its weight gradient into .grad itself (empty at the
    first micro-batch, accumulating at the next), with softmax chunks smaller than the batch: every .grad equals
    that of the model's own output layer run through autograd, to float rounding."""
    model = tiny_causal_lm(kind, seed=0)[0] if kind != "tied-llama" else _tied_llama()
    batches = [collate_pairs(_pairs(), pad_token_id=0), collate_pairs(_pairs()[::-1][:2], pad_token_id=0)]
    monkeypatch.setattr(label_logprob, "CHUNK_ELEMENTS", 3 * model.config.vocab_size)  # 3 rows per chunk
    grads = {}
    for fused in (True, False):
        fast = FastPaths(fused_output_layer=fused, grad_into_weight=True)
        model.zero_grad(set_to_none=True)
        for weight, batch in zip((1.0, -0.7), batches):
            out = concatenated_forward(model, batch, fast=fast)
            (weight * (out.chosen - 0.3 * out.rejected)).sum().backward()
        grads[fused] = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert grads[True].keys() == grads[False].keys()
    for name, reference in grads[False].items():
        # float32 rounding of sums over tens of positions: within 1e-6 of the tensor's largest entry
        torch.testing.assert_close(grads[True][name], reference, atol=1e-6 * reference.abs().max().item(), rtol=0,
                                   msg=name)


def test_fused_output_layer_only_where_it_is_the_same_function():
    """Wrapped models, output layers with a bias, and autocast keep the model's own output layer."""
    model, _ = tiny_causal_lm("gpt2", seed=0)
    assert model_paths(model, FastPaths()).output_weight is model.get_output_embeddings().weight
    assert model_paths(model, FastPaths(fused_output_layer=False)).output_weight is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model_paths(model, FastPaths()).output_weight is None
    wrapper = torch.nn.Module()
    wrapper.module = model
    assert model_paths(wrapper, FastPaths()).output_weight is None
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    assert model_paths(model, FastPaths()).output_weight is None


def test_one_forward_looks_under_the_wrappers_once(model, monkeypatch):
    """Every path of a forward is decided from one unwrapping of the model (dpolab.fast.paths.model_paths)."""
    calls = []
    unwrap = paths.unwrap
    monkeypatch.setattr(paths, "unwrap", lambda m: calls.append(m) or unwrap(m))
    for fast in (FastPaths(), FastPaths(pair_tree=False), FastPaths.off()):
        calls.clear()
        concatenated_forward(model, collate_pairs(_pairs(), pad_token_id=0), fast=fast)
        assert calls == [model]


def test_concatenated_forward_splits_chosen_then_rejected(model):
    """Rows 0..B-1 are chosen, B..2B-1 rejected: equal to scoring each side alone (other padding, other width)."""
    pairs = _pairs()
    out = concatenated_forward(model, collate_pairs(pairs, pad_token_id=0))
    assert out.chosen_lengths.tolist() == [4, 1, 1] and out.rejected_lengths.tolist() == [2, 4, 3]
    for side, got in (("chosen", out.chosen), ("rejected", out.rejected)):
        alone = collate_sequences(
            [p.prompt_ids for p in pairs],
            [getattr(p, f"{side}_ids") for p in pairs],
            [getattr(p, f"{side}_mask") for p in pairs],
            pad_token_id=3,
            pad_to_multiple_of=16,
        )
        with torch.no_grad():
            expected, _ = sequence_forward(model, alone)
        torch.testing.assert_close(got.detach(), expected, atol=1e-5, rtol=0)
    averaged = concatenated_forward(model, collate_pairs(pairs, pad_token_id=0), average=True)
    torch.testing.assert_close(averaged.chosen, out.chosen / out.chosen_lengths, atol=1e-6, rtol=0)


def test_lora_model_uses_scored_path_and_matches_full():
    peft = pytest.importorskip("peft")
    base, _ = tiny_causal_lm("llama", seed=0)
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "lm_head"], init_lora_weights=False)
    model = peft.get_peft_model(base, config)
    batch = collate_pairs(_pairs(), pad_token_id=0)
    assert supports_scored_logits(model)
    fast, slow = concatenated_forward(model, batch), concatenated_forward(model, batch, fast=FastPaths.off())
    torch.testing.assert_close(fast.chosen, slow.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.rejected, slow.rejected, atol=1e-5, rtol=0)


def test_errors_name_the_row_position_and_field(model):
    logits = torch.zeros(2, 4, 10)
    labels = torch.tensor([[-100, 1, 2, 3], [-100, 4, 10, -100]])
    with pytest.raises(ValueError, match=r"row 1, position 2, field labels: token id 10"):
        sequence_logprobs(logits, labels)
    batch = collate_pairs(_pairs(), pad_token_id=0, index=[40, 41, 42])
    batch.labels[4, :] = -100  # the rejected response of the second pair
    with pytest.raises(ValueError, match=r"pair 1 \(dataset row 41\), rejected response, field labels"):
        concatenated_forward(model, batch)
    odd = PairBatch(batch.input_ids[:5], batch.attention_mask[:5], batch.labels[:5], index=batch.index)
    with pytest.raises(ValueError, match="even number of rows"):
        concatenated_forward(model, odd)


def _tied_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=2, tie_word_embeddings=True)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("kind", ["gpt2", "tied-llama"])
@pytest.mark.parametrize("share_prompt", [False, True])
def test_sparse_lookup_of_a_tied_embedding_gives_the_dense_gradient(kind, share_prompt):
    """A tied input embedding is looked up with a sparse gradient: the parameter's .grad is still dense and
    equals the model's own lookup's gradient (padding_idx rows included) to float rounding."""
    model = tiny_causal_lm("gpt2", seed=0)[0] if kind == "gpt2" else _tied_llama()
    embedding = model.get_input_embeddings()
    assert embedding.weight is model.get_output_embeddings().weight
    pairs = _pairs() + [TokenizedPair([2, 5], [2, 9, 2], [7, 2], [1, 1, 1], [1, 1])]  # id 2: Llama's padding_idx
    batch = collate_pairs(pairs, pad_token_id=2)
    with torch.no_grad():
        assert model_paths(model, FastPaths()).sparse_embedding is None
    assert model_paths(model, FastPaths()).sparse_embedding is embedding
    assert model_paths(model, FastPaths(sparse_embedding=False)).sparse_embedding is None
    grads = {}
    for sparse in (True, False):
        model.zero_grad(set_to_none=True)
        out = concatenated_forward(model, batch, fast=FastPaths(pair_tree=share_prompt, sparse_embedding=sparse))
        (out.chosen - 0.3 * out.rejected).sum().backward()
        assert not embedding.weight.grad.is_sparse
        grads[sparse] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, dense in grads[False].items():
        torch.testing.assert_close(grads[True][name], dense, atol=1e-6, rtol=1e-5, msg=name)
    if embedding.padding_idx is not None:
        assert torch.count_nonzero(grads[True]["model.embed_tokens.weight"][2]) > 0  # the output layer's part


def test_untied_or_frozen_embeddings_keep_the_models_own_lookup():
    untied, _ = tiny_causal_lm("llama", seed=0)
    assert model_paths(untied, FastPaths()).sparse_embedding is None
    tied = _tied_llama()
    tied.get_input_embeddings().weight.requires_grad_(False)
    assert model_paths(tied, FastPaths()).sparse_embedding is None


def test_row_sums_are_correctly_rounded():
    """Per-row sums of a few hundred token log-probs equal the float64 sum rounded once to float32 (within half
    an ulp), where one-after-the-other float32 accumulation drifts by several ulps."""
    generator = torch.Generator().manual_seed(0)
    scored = -9 * torch.rand(4 * 300, generator=generator)  # 4 rows of 300 tokens, |sum| ~ 1350
    row_of = torch.arange(4).repeat_interleave(300)
    got = row_sums(scored, row_of, 4)
    exact = torch.zeros(4, dtype=torch.float64).index_add(0, row_of, scored.double())
    half_ulp = torch.finfo(torch.float32).eps * exact.abs() / 2
    assert got.dtype == torch.float32
    assert ((got.double() - exact).abs() <= half_ulp * 1.0001).all()


@pytest.mark.parametrize("direct", [False, True])
def test_output_layer_log_prob_against_float64_log_softmax(direct, monkeypatch):
    """OutputLayerLogProb on random hidden states with a repeated row (one row scoring two targets) and
    3-row softmax chunks: values and both gradients equal log_softmax(h W^T)[y] computed in float64."""
    monkeypatch.setattr(label_logprob, "CHUNK_ELEMENTS", 3 * 40)
    generator = torch.Generator().manual_seed(5)
    hidden = torch.randn(7, 16, generator=generator, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(40, 16, generator=generator) / 4)
    rows = torch.tensor([0, 1, 2, 2, 3, 4, 5, 6])
    targets = torch.randint(40, (8,), generator=generator)
    g = torch.randn(8, generator=generator)
    out = output_layer.OutputLayerLogProb.apply(hidden, weight, rows, targets, direct)
    (out * g).sum().backward()
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = torch.log_softmax(h64 @ w64.T, -1)[rows, targets]
    (expected * g.double()).sum().backward()
    torch.testing.assert_close(out.double(), expected.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(hidden.grad.double(), h64.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weight.grad.double(), w64.grad, atol=1e-5, rtol=1e-5)
