"""The reward model of the RLHF pipeline: its loss by hand, learning a one-token preference, reloading through
transformers, and the RL arms that read it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dpolab.data.tokenize import TokenizedPair, pad_token_id
from dpolab.losses.reward_model import reward_model_loss
from dpolab.models.tiny import tiny_causal_lm
from dpolab.train.reward import (
    RewardModelJudge,
    pair_rewards,
    reward_model_from_causal_lm,
    save_reward_model,
    sequence_rewards,
    train_reward_model,
)


def test_loss_and_gradient_by_hand():
    """r_w = 1, r_l = −1: margin 2, loss −log σ(2) = log(1 + e^−2) = 0.126928; ∂/∂r_w = −σ(−2) = −0.119203,
    ∂/∂r_l = +0.119203. With margin m = 2 the loss is log 2 and the gradients ∓½. Centring c = 0.5 on r_w = 3,
    r_l = 1: −log σ(2) + 0.5·16 = 8.126928, ∂/∂r_w = −0.119203 + 2·0.5·4 = 3.880797, ∂/∂r_l = 0.119203 + 4."""
    chosen = torch.tensor([1.0, 1.0, 3.0], requires_grad=True)
    rejected = torch.tensor([-1.0, -1.0, 1.0], requires_grad=True)
    plain = reward_model_loss(chosen[:1], rejected[:1])
    assert plain.item() == pytest.approx(math.log1p(math.exp(-2)), abs=1e-6)
    assert plain.item() == pytest.approx(0.126928, abs=1e-6)
    with_margin = reward_model_loss(chosen[1:2], rejected[1:2], margin=torch.tensor([2.0]))
    assert with_margin.item() == pytest.approx(math.log(2), abs=1e-7)
    centred = reward_model_loss(chosen[2:], rejected[2:], center_rewards_coefficient=0.5)
    assert centred.item() == pytest.approx(8.126928, abs=1e-5)
    (plain.sum() + with_margin.sum() + centred.sum()).backward()
    assert chosen.grad.tolist() == pytest.approx([-0.119203, -0.5, 3.880797], abs=1e-6)
    assert rejected.grad.tolist() == pytest.approx([0.119203, 0.5, 4.119203], abs=1e-6)


def test_loss_gradient_matches_finite_differences():
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(5, generator=g, dtype=torch.float64, requires_grad=True)
    margin = torch.rand(5, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a, b: reward_model_loss(a, b, margin=margin, center_rewards_coefficient=0.1), (chosen, rejected))


def test_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        reward_model_loss(torch.zeros(3), torch.zeros(2))


def one_token_pairs(n: int, seed: int, good: int = 7, bad: int = 9) -> list[TokenizedPair]:
    """Random prompts and responses whose chosen and rejected sides differ only in one token: ``good`` vs ``bad``
    at a random position (so the reward model must find the token, not a position)."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        prompt = rng.integers(20, 200, size=int(rng.integers(2, 5))).tolist()
        response = rng.integers(20, 200, size=6).tolist()
        at = int(rng.integers(0, 6))
        chosen, rejected = list(response), list(response)
        chosen[at], rejected[at] = good, bad
        pairs.append(TokenizedPair(prompt, chosen, rejected, [1] * 6, [1] * 6))
    return pairs


def test_a_one_token_preference_is_learned_to_high_heldout_accuracy():
    """On a tiny Llama, 64 training pairs whose sides differ in one known token: after training, the held-out pairs
    (new prompts and responses) are ordered right nearly always. The task is learned in both orientations (token 7
    preferred to 9, and 9 to 7): the untrained model's accuracies on the two are complements (each pair flips, ties
    count ½), so at least one starts at or below chance, and training must take both to ≥ 0.95. The checkpoint
    returned is the best by held-out accuracy."""
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    pad = pad_token_id(tokenizer)
    befores = []
    for good, bad in ((7, 9), (9, 7)):
        rm = reward_model_from_causal_lm(model, tokenizer, seed=0)
        train_pairs, heldout = one_token_pairs(64, 1, good, bad), one_token_pairs(64, 2, good, bad)

        def evaluate(m, heldout=heldout):
            c, r = pair_rewards(m, heldout, pad)
            return {"eval_accuracy": ((c > r).float() + 0.5 * (c == r).float()).mean().item()}

        befores.append(evaluate(rm)["eval_accuracy"])
        result = train_reward_model(rm, train_pairs, pad, evaluate=evaluate, num_train_epochs=4, learning_rate=3e-3,
                                    per_device_train_batch_size=8, progress=False)
        after = evaluate(rm)["eval_accuracy"]
        assert after >= 0.95, (good, bad, after)
        assert after == result.best_metric == max(r["eval_accuracy"] for r in result.eval_history)
        assert len(result.history) == 4 * 8 and result.history[-1]["epoch"] == 4.0
        assert [r["step"] for r in result.eval_history] == [8, 16, 24, 32]  # every epoch's end
    assert sum(befores) == pytest.approx(1.0) and min(befores) <= 0.5


def test_reward_model_copies_the_trunk_exactly():
    model, tokenizer = tiny_causal_lm("gpt2", seed=0)
    rm = reward_model_from_causal_lm(model, tokenizer, seed=0)
    for name, tensor in model.base_model.state_dict().items():
        assert torch.equal(rm.base_model.state_dict()[name], tensor), name
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == pad_token_id(tokenizer)


def test_saved_reward_model_reloads_through_transformers_and_scores_identically(tmp_path):
    """The folder loads with AutoModelForSequenceClassification (one label) and with load_classifier_judge; both
    score exactly as the trained model does (token ids, and texts tokenized by the saved tokenizer)."""
    from transformers import AutoModelForSequenceClassification

    from dpolab.sample.judges import load_classifier_judge

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    pad = pad_token_id(tokenizer)
    rm = reward_model_from_causal_lm(model, tokenizer, seed=3)
    train_reward_model(rm, one_token_pairs(16, seed=1), pad, num_train_epochs=1, learning_rate=1e-3, progress=False)
    folder = save_reward_model(rm, tokenizer, tmp_path / "rm", {"note": "test"})
    loaded = AutoModelForSequenceClassification.from_pretrained(folder)
    assert loaded.config.num_labels == 1
    pairs = one_token_pairs(6, seed=5)
    prompts = [p.prompt_ids for p in pairs]
    responses = [p.chosen_ids for p in pairs]
    expected = sequence_rewards(rm, prompts, responses, pad)
    assert torch.equal(sequence_rewards(loaded.eval(), prompts, responses, pad), expected)
    texts = ["a good movie", "the plot is thin and slow", "x"]
    judge = load_classifier_judge(str(folder))
    enc = [tokenizer(t).input_ids for t in texts]
    direct = sequence_rewards(rm, enc, [[] for _ in enc], pad).numpy()
    np.testing.assert_allclose(judge(texts), direct, rtol=0, atol=1e-5)


def test_a_reward_model_with_another_vocabulary_is_refused_by_name():
    model, tokenizer = tiny_causal_lm("llama", seed=0)
    _, other = tiny_causal_lm("gpt2", seed=0)
    rm = reward_model_from_causal_lm(model, tokenizer)
    with pytest.raises(ValueError, match="reward model 'rm-x'.*vocabulary differs"):
        RewardModelJudge(rm, tokenizer, other, name="rm-x")


def test_rl_arms_with_a_reward_model_query_it_once_per_sample_on_the_ground_truth_arms_prompts():
    """RLOO and PPO reading a reward model sample the same prefixes with the same seeds as with the ground truth
    (the rollouts of step 0 are token-for-token equal, since both start from the same policy), and the reward model
    scores each sample exactly once (prompt ids + sampled ids)."""
    import copy

    from dpolab.baselines import rollout as rollout_module
    from dpolab.baselines.ppo import ppo_train
    from dpolab.baselines.rloo import rloo_train
    from dpolab.baselines.rollout import RolloutSettings

    def settings(steps):
        return RolloutSettings(steps=steps, prompts_per_step=2, k=2, max_new_tokens=3, seed=4, progress=False)

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    rm = reward_model_from_causal_lm(model, tokenizer, seed=1)
    prompts = ["a b", "c d e", "f", "g h"]
    seen = {}
    real = rollout_module.rollout

    def spy(policy, tok, ps, order, step, reward_fn, settings):
        samples, reward = real(policy, tok, ps, order, step, reward_fn, settings)
        seen.setdefault(type(reward_fn).__name__, []).append((samples.prompts, samples.token_ids))
        return samples, reward

    for train_fn, name in ((rloo_train, "rloo"), (ppo_train, "ppo")):
        seen.clear()
        for reward_fn in (lambda texts: np.array([len(t) for t in texts], float),
                          RewardModelJudge(rm, tokenizer, tokenizer)):
            policy = copy.deepcopy(model)
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(f"dpolab.baselines.{name}.rollout", spy)
                train_fn(policy, model, tokenizer, prompts, reward_fn, settings(steps=2))
        judge_runs, text_runs = seen["RewardModelJudge"], seen["function"]
        assert [p for p, _ in judge_runs] == [p for p, _ in text_runs]  # the same prefixes, step by step
        assert judge_runs[0][1] == text_runs[0][1]  # step 0: same policy, same seeds, same samples
    judge = RewardModelJudge(rm, tokenizer, tokenizer)
    rloo_train(copy.deepcopy(model), model, tokenizer, prompts, judge, settings(steps=3))
    assert judge.calls == 3 * 2 * 2


def test_train_stage_reward_from_preference_files(tmp_path):
    """`dpolab train stage=reward` on the same JSONL preference rows DPO reads: metrics with trl RewardTrainer's
    names, a folder that AutoModelForSequenceClassification loads and that scores the held-out pairs as the run
    reported (its best held-out accuracy); SFT-format rows are refused naming the row and the missing field."""
    import json

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from dpolab.cli import main
    from dpolab.data.prepare import prepare_pairs, tokenize_config
    from dpolab.evaluate import preference_accuracy
    from dpolab.train.config import TrainConfig
    from tests.tiny_runs import make_examples

    def write(path, examples):
        path.write_text("".join(json.dumps({"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}) + "\n"
                                for e in examples))
        return str(path)

    train_file, eval_file = write(tmp_path / "train.jsonl", make_examples(24)), write(tmp_path / "eval.jsonl",
                                                                                       make_examples(12, offset=24))
    out = tmp_path / "rm"
    code = main(["train", "stage=reward", "model=tiny-llama", f"train_data={train_file}", f"eval_data={eval_file}",
                 "num_train_epochs=2", "micro_batch_size=8", "lr=1e-3", "progress=false", f"output_dir={out}"])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    assert len(steps) == 2 * 3 and {"accuracy", "margin", "mean_reward", "grad_norm"} <= set(steps[0])
    assert [r["step"] for r in evals] == [3, 6] and all(r["eval_pairs"] == 12 for r in evals)
    summary = json.loads((out / "summary.json").read_text())
    best = max(evals, key=lambda r: r["eval_accuracy"])
    assert summary["best_eval_accuracy"] == best["eval_accuracy"]
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    tokenizer = AutoTokenizer.from_pretrained(out)
    heldout = prepare_pairs(eval_file, tokenizer, tokenize_config(TrainConfig()), name=eval_file).pairs
    chosen, rejected = pair_rewards(loaded, heldout, pad_token_id(tokenizer))
    assert preference_accuracy(chosen.numpy(), rejected.numpy())["accuracy"] == best["eval_accuracy"]
    sft_file = tmp_path / "sft.jsonl"
    sft_file.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n"
                        + json.dumps({"prompt": "The movie", "completion": " was fine"}) + "\n")
    from dpolab.train.trainer import train

    with pytest.raises(ValueError, match=r"sft.jsonl:row 2: field 'completion'.*no 'chosen' and no 'rejected'.*"
                                         r"reward model \(stage=reward\)"):
        train({"stage": "reward", "model": "tiny-llama", "train_data": str(sft_file), "progress": False,
               "output_dir": str(tmp_path / "rm2")})
