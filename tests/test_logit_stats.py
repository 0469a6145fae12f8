"""trl's ``logits/chosen``, ``logits/rejected`` and ``entropy``: by hand, and every log-prob path against a slow
reference computed from the model's full logits in float64."""

import math

import pytest
import torch

from dpolab.data.batch import collate_pairs
from dpolab.data.tokenize import TokenizedPair
from dpolab.fast import label_logprob, output_layer
from dpolab.fast.logit_stats import logit_stats
from dpolab.fast.paths import FastPaths
from dpolab.logprobs import concatenated_forward, shift_labels
from dpolab.models.tiny import tiny_causal_lm
from dpolab.train.objective import Objective, batch_objective, mean_metrics
from dpolab.train.reference import make_reference

pytestmark = pytest.mark.usefixtures("one_thread")

# prompts of different lengths, a masked token inside two responses, responses of unequal lengths
PAIRS = [
    TokenizedPair([5, 6, 7], [8, 9, 10, 11], [12, 13], [1, 1, 1, 1], [1, 1]),
    TokenizedPair([14, 15], [16, 17], [18, 19, 20, 21, 22], [1, 0], [1, 1, 0, 1, 1]),
    TokenizedPair([23, 24, 25, 26, 27], [28], [29, 30, 31], [1], [1, 1, 1]),
]
PATHS = {
    "fused, pair tree": FastPaths(),
    "fused, 2B rows": FastPaths(pair_tree=False),
    "unfused scored logits, pair tree": FastPaths(fused_output_layer=False),
    "unfused scored logits, 2B rows": FastPaths(pair_tree=False, fused_output_layer=False),
    "full logits": FastPaths.off(),
}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    model, _ = tiny_causal_lm(request.param, seed=0)
    return model.eval()


def slow_stats(model, batch) -> torch.Tensor:
    """Per row of the 2B-row batch, Σ over its scored positions of mean_v z_v and of −Σ_v π_v log π_v, from the full
    logits in float64. Shape: (2B, 2)."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    scored = (shift_labels(batch.labels) != -100).double()
    logp = torch.log_softmax(logits, -1)
    per_position = torch.stack([logits.mean(-1), -(logp.exp() * logp).sum(-1)], -1)
    return (per_position * scored[..., None]).sum(1)


def test_logit_stats_by_hand():
    """z = (0, ln 2, ln 5): the mean is ln(10)/3; π = (1, 2, 5)/8, so H = −Σ π ln π = ln 8 − (2 ln 2 + 5 ln 5)/8.
    A constant row c over V = 3 tokens: mean c, H = ln 3 (the uniform distribution)."""
    logits = torch.tensor([[0.0, math.log(2), math.log(5)], [4.0, 4.0, 4.0]])
    got = logit_stats(logits)
    expected = [[math.log(10) / 3, math.log(8) - (2 * math.log(2) + 5 * math.log(5)) / 8], [4.0, math.log(3)]]
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("given_lse", [False, True])
def test_logit_stats_in_chunks_with_repeated_rows_equal_a_float64_log_softmax(given_lse, monkeypatch):
    monkeypatch.setattr(label_logprob, "CHUNK_ELEMENTS", 3 * 40)  # 3 rows per chunk
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(7, 40, generator=generator) * 3
    rows = torch.tensor([0, 1, 2, 2, 3, 6, 5, 4])
    lse = torch.logsumexp(logits, -1) if given_lse else None
    logp = torch.log_softmax(logits.double(), -1)[rows]
    expected = torch.stack([logits.double()[rows].mean(-1), -(logp.exp() * logp).sum(-1)], -1)
    torch.testing.assert_close(logit_stats(logits, rows, lse).double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("path", PATHS)
def test_every_log_prob_path_gives_the_statistics_of_the_full_logits(model, path, monkeypatch):
    """Fused or not, pair tree or 2B rows, with grad as in training: the (2B, 2) sums equal the slow ones, and the
    fused output layer is the path that ran when it should (the statistics come from its own logits)."""
    fused_calls = []
    apply = output_layer.OutputLayerLogProb.apply
    monkeypatch.setattr(output_layer.OutputLayerLogProb, "apply",
                        lambda *args: fused_calls.append(1) or apply(*args))
    batch = collate_pairs(PAIRS, pad_token_id=0)
    got = concatenated_forward(model, batch, fast=PATHS[path], with_stats=True)
    assert got.chosen.requires_grad and not got.logit_stats.requires_grad
    assert bool(fused_calls) == path.startswith("fused")
    torch.testing.assert_close(got.logit_stats.double(), slow_stats(model, batch), atol=2e-5, rtol=1e-5)
    plain = concatenated_forward(model, batch, fast=PATHS[path])
    assert plain.logit_stats is None and torch.equal(plain.chosen, got.chosen)  # the log-probs do not change


@pytest.mark.parametrize("settings", [{}, {"use_weighting": True}], ids=["sequence sums", "per-token scores (WPO)"])
def test_the_step_metrics_are_the_token_means_of_trl(model, settings):
    """logits/chosen = Σ_chosen tokens mean logit / chosen tokens, logits/rejected likewise, entropy over the tokens of
    both sides, as trl's DPOTrainer computes them; WPO scores tokens on its own full-logits path."""
    batch = collate_pairs(PAIRS, pad_token_id=0)
    reference = make_reference("copy", model)
    _, sums = batch_objective(model, reference, batch, Objective(**settings))
    metrics = mean_metrics(sums, "dpo")
    slow = slow_stats(model, batch)
    lengths = (shift_labels(batch.labels) != -100).sum(-1).double()
    b = batch.num_pairs
    expected = {"logits/chosen": slow[:b, 0].sum() / lengths[:b].sum(),
                "logits/rejected": slow[b:, 0].sum() / lengths[b:].sum(),
                "entropy": slow[:, 1].sum() / lengths.sum()}
    for name, value in expected.items():
        assert metrics[name] == pytest.approx(float(value), abs=1e-5), name
    assert "entropy" not in mean_metrics(sums, "sft")  # SFT logs its own few metrics
