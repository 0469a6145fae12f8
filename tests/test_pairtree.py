"""The pair-tree layout: built by hand on two pairs, equal to the 2B-row slow path on random pairs, fallbacks."""

from types import SimpleNamespace

import pytest
import torch

from dpolab.data.batch import collate_pairs
from dpolab.data.tokenize import TokenizedPair
from dpolab.fast.pairtree import pair_tree
from dpolab.fast.paths import FastPaths, supports_shared_prompt
from dpolab.logprobs import concatenated_forward
from dpolab.models.tiny import tiny_causal_lm


def _two_pairs():
    return [TokenizedPair([5, 6, 7], [8, 9], [10], [1, 1], [1]), TokenizedPair([1], [2], [3, 4], [1], [1, 1])]


def test_layout_by_hand():
    """Rows [c0, c1, r0, r1] of width 5 become 2 tree rows of width 6 (pair 0: 5 + 4 - 3 shared)."""
    batch = collate_pairs(_two_pairs(), pad_token_id=0)
    tree = pair_tree(batch.input_ids, batch.attention_mask, batch.labels)
    assert tree.shared.tolist() == [3, 1] and tree.lengths.tolist() == [6, 4]
    assert tree.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10]
    assert tree.input_ids[1, :4].tolist() == [1, 2, 3, 4]
    assert tree.position_ids[0].tolist() == [0, 1, 2, 3, 4, 3]  # the rejected token sits at position 3 again
    assert tree.position_ids[1, :4].tolist() == [0, 1, 1, 2]
    expected0 = [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [1, 1, 1, 0, 0, 0],
                 [1, 1, 1, 1, 0, 0],  # chosen 8: prompt and itself
                 [1, 1, 1, 1, 1, 0],  # chosen 9
                 [1, 1, 1, 0, 0, 1]]  # rejected 10: prompt and itself, not the chosen branch
    assert tree.allowed[0].int().tolist() == expected0
    expected1 = [[1, 0, 0, 0, 0, 0],
                 [1, 1, 0, 0, 0, 0],
                 [1, 0, 1, 0, 0, 0],
                 [1, 0, 1, 1, 0, 0],
                 [0, 0, 0, 0, 1, 0],  # padding sees only itself
                 [0, 0, 0, 0, 0, 1]]
    assert tree.allowed[1].int().tolist() == expected1
    # scored tokens, row-major over [c0, c1, r0, r1]: 8, 9 | 2 | 10 | 3, 4; flat index = pair * 6 + tree column
    assert tree.targets.tolist() == [8, 9, 2, 10, 3, 4]
    assert tree.source_row.tolist() == [0, 0, 1, 2, 3, 3]
    assert tree.predictor.tolist() == [2, 3, 6, 2, 6, 8]


def test_shared_prefix_stops_at_the_first_scored_label():
    """Masked response tokens common to both sides may join the prefix, scored ones never do."""
    pairs = [TokenizedPair([23, 24], [25, 26, 27, 28], [25, 26, 30], [0, 1, 1, 1], [0, 1, 1]),
             TokenizedPair([4, 5], [6, 7], [6, 7], [1, 1], [1, 1])]  # identical responses: prefix = the prompt
    batch = collate_pairs(pairs, pad_token_id=0)
    tree = pair_tree(batch.input_ids, batch.attention_mask, batch.labels)
    assert tree.shared.tolist() == [3, 2]


def test_left_padded_batch_has_no_tree_and_falls_back():
    model, _ = tiny_causal_lm("llama", seed=0)
    batch = collate_pairs(_two_pairs(), pad_token_id=0)
    flipped = [t.flip(-1) for t in (batch.input_ids, batch.attention_mask, batch.labels)]
    assert pair_tree(*flipped) is None
    assert pair_tree(batch.input_ids, batch.attention_mask, batch.labels) is not None


def test_only_verified_families_and_attention_kernels_take_the_tree():
    assert supports_shared_prompt(tiny_causal_lm("gpt2", seed=0)[0])
    assert supports_shared_prompt(tiny_causal_lm("llama", seed=0)[0])
    for model_type, attn in (("mistral", "sdpa"), ("llama", "flash_attention_2"), (None, None)):
        fake = SimpleNamespace(config=SimpleNamespace(model_type=model_type, _attn_implementation=attn))
        assert not supports_shared_prompt(fake)


def _random_pairs(generator, n, vocab):
    def ids(k):
        return torch.randint(3, vocab, (k,), generator=generator).tolist()

    pairs = []
    for i in range(n):
        prompt = ids(int(torch.randint(1, 7, (1,), generator=generator)))
        common = ids(i % 3)  # responses that start alike (masked, so the prefix may grow into them)
        chosen = common + ids(int(torch.randint(1, 9, (1,), generator=generator)))
        rejected = common + ids(int(torch.randint(1, 9, (1,), generator=generator)))
        masks = [[0] * len(common) + [int(x) for x in (torch.rand(len(r) - len(common), generator=generator) > 0.2)]
                 for r in (chosen, rejected)]
        for m in masks:
            m[-1] = 1  # at least one scored token per response
        pairs.append(TokenizedPair(prompt, chosen, rejected, *masks))
    return pairs


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_tree_equals_two_row_slow_path_values_and_gradients(kind, attention, fused):
    """Same log-probs and parameter gradients as the full-logits 2B-row reference, to float32 rounding, with
    dpolab's fused output layer and with the model's own."""
    model, _ = tiny_causal_lm(kind, seed=0)
    model.config._attn_implementation = attention
    batch = collate_pairs(_random_pairs(torch.Generator().manual_seed(7), 6, model.config.vocab_size), 0)
    calls = []
    hook = model.base_model.register_forward_pre_hook(  # the transformer blocks' input, with or without the head
        lambda mod, args, kwargs: calls.append(kwargs["attention_mask"].shape), with_kwargs=True)
    try:
        fast = concatenated_forward(model, batch, fast=FastPaths(fused_output_layer=fused))
    finally:
        hook.remove()
    assert calls[0][0] == batch.num_pairs  # one row per pair: the tree layout ran
    slow = concatenated_forward(model, batch, fast=FastPaths.off())
    params = list(model.parameters())
    g_fast = torch.autograd.grad((fast.chosen - 0.5 * fast.rejected).sum(), params)
    g_slow = torch.autograd.grad((slow.chosen - 0.5 * slow.rejected).sum(), params)
    torch.testing.assert_close(fast.chosen, slow.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(fast.rejected, slow.rejected, atol=1e-5, rtol=0)
    assert torch.equal(fast.chosen_lengths, slow.chosen_lengths) and torch.equal(fast.rejected_lengths,
                                                                                 slow.rejected_lengths)
    for a, b in zip(g_fast, g_slow):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_tree_with_full_logits_and_errors():
    """Full logits on the tree rows (the model's own output layer at every position) give the same values; a
    response with nothing scored is named as before."""
    model, _ = tiny_causal_lm("llama", seed=0)
    batch = collate_pairs(_random_pairs(torch.Generator().manual_seed(3), 4, model.config.vocab_size), 0,
                          index=[10, 11, 12, 13])
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    with torch.no_grad():
        scored = concatenated_forward(model, batch)
        full = concatenated_forward(model, batch, fast=FastPaths(scored_logits=False, fused_output_layer=False))
        reference = concatenated_forward(model, batch, fast=FastPaths.off())
    hook.remove()
    tree = pair_tree(batch.input_ids, batch.attention_mask, batch.labels)
    assert seen[0] == (*tree.input_ids.shape, model.config.vocab_size)  # fused: no head; full: every tree position
    torch.testing.assert_close(full.chosen, scored.chosen, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.rejected, reference.rejected, atol=1e-5, rtol=0)
    batch.labels[5, :] = -100  # rejected response of pair 1
    with pytest.raises(ValueError, match=r"pair 1 \(dataset row 11\), rejected response, field labels"):
        concatenated_forward(model, batch)
