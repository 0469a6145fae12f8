"""The recall task of notebook 04 (conversations, rule reward, rollouts, pairs) and DPO under both masking policies
(dpolab.experiments.multiturn_dpo)."""

import json
import math

import numpy as np
import pytest
import torch

from dpolab.experiments.multiturn_dpo import masking_invariance, train_with_mask_policy
from dpolab.experiments.recall import (
    EMPTY_REPLY,
    SLOTS,
    Conversation,
    Rollouts,
    assistant,
    constructed_pairs,
    make_conversations,
    recall_reward,
    recall_row,
    recalls,
    rollout,
    sampled_pairs,
    save_results,
    user,
)
from dpolab.models.tiny import tiny_causal_lm


@pytest.fixture(scope="module")
def tiny():
    """Policy and reference: tiny Llamas (ChatML template) whose output layers are scaled up so log-probs vary by
    token (a fresh model is nearly uniform, every per-token mean nearly log V)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # forwards of ~60 tokens: threads only cost on a shared machine
    pair = tiny_causal_lm("llama", seed=0), tiny_causal_lm("llama", seed=1)
    with torch.no_grad():
        for model, _ in pair:
            model.lm_head.weight.mul_(30.0)
    yield pair[0][0].eval(), pair[1][0].eval(), pair[0][1]
    torch.set_num_threads(threads)


def colour(value="green"):
    return Conversation("colour", value, (user(f"My favourite colour is {value}. Tell me a fun fact."),), (),
                        "What is my favourite colour?")


# ---- conversations and the rule reward ----


def test_conversations_are_seeded_balanced_and_held_out_values_are_new():
    train = make_conversations(40, "train", filler_turns=1, seed=3)
    assert train == make_conversations(40, "train", filler_turns=1, seed=3)
    assert [c.slot for c in train[:4]] == list(SLOTS)
    for c in train:
        assert c.value in c.opening[0]["content"] and c.value in SLOTS[c.slot].split("train")
        assert len(c.fillers) == 1 and c.later_user_turns[-1] == c.question
    held_out = {c.value for c in make_conversations(40, "eval", seed=3)}
    assert held_out and not held_out & {c.value for c in train}


def test_reward_by_hand():
    conv = colour("green")
    # "Your favourite colour is green." has 5 words: 1 - 0.01 * 5
    assert recall_reward("Your favourite colour is green.", conv) == pytest.approx(0.95)
    assert recall_reward("GREEN!", conv, length_penalty=0.0) == 1.0  # case-insensitive
    assert recall_reward("green or blue?", conv) == 0.0  # another value of the slot
    assert recall_reward("Greenland is nice.", conv) == 0.0  # whole words only
    assert recall_reward("green " * 200, conv) == 0.0  # the penalty is clipped at 0, not negative
    assert recalls("It is green.", conv) and not recalls("I don't know.", conv)
    with pytest.raises(ValueError, match="length_penalty"):
        recall_reward("green", conv, length_penalty=-1)


def test_empty_reply_is_replaced():
    assert assistant("  ")["content"] == EMPTY_REPLY and assistant(" hi ")["content"] == "hi"


# ---- rollouts and pairs ----


def test_rollout_shapes_roles_and_seed(tiny):
    model, _, tok = tiny
    convs = make_conversations(3, "train", filler_turns=1, seed=0)
    a = rollout(model, tok, convs, 2, max_new_tokens=4, seed=5)
    assert a.rewards.shape == a.correct.shape == (3, 2)
    assert ((a.rewards >= 0) & (a.rewards <= 1)).all()
    for conv, row in zip(convs, a.responses):
        for side in row:
            assert [m["role"] for m in side] == ["assistant", "user", "assistant", "user", "assistant"]
            assert [m["content"] for m in side[1::2]] == list(conv.later_user_turns)
    assert rollout(model, tok, convs, 2, max_new_tokens=4, seed=5).responses == a.responses


def hand_rollouts():
    """Two conversations of 4 rollouts: rewards [0.99, 0, 0.97, 0] (one tie among the 6 candidate pairs) and
    [0, 0, 0, 0] (no pair at all)."""
    convs = [colour("green"), colour("blue")]

    def side(answer, ack="Sure."):
        return (assistant(ack), user("What is my favourite colour?"), assistant(answer))

    responses = [[side("Green."), side("Red.", "Hm."), side("It is green."), side("No idea.")],
                 [side("Pink."), side("No."), side("Pink.", "Ok."), side("No.", "Ok.")]]
    rewards = np.array([[0.99, 0, 0.97, 0], [0, 0, 0, 0]])
    return Rollouts(convs, responses, rewards, rewards > 0)


def test_sampled_pairs_follow_the_rewards():
    rollouts = hand_rollouts()
    examples, stats = sampled_pairs(rollouts, "all_pairs")
    # conversation 0: 6 candidates, 1 tie (0 vs 0) -> 5 pairs; conversation 1: all 6 ties
    assert (stats.num_pairs, stats.ties, stats.prompts_without_pairs) == (5, 7, 1)
    rank = {"Green.": 0.99, "It is green.": 0.97, "Red.": 0, "No idea.": 0}
    for ex in examples:
        assert ex.prompt == rollouts.conversations[0].opening and len(ex.chosen) == 3
        assert rank[ex.chosen[-1]["content"]] > rank[ex.rejected[-1]["content"]]
    assert any(ex.chosen[0] != ex.rejected[0] for ex in examples)  # acks differ in some pairs


def test_constructed_pairs_share_all_but_the_answer():
    rollouts = hand_rollouts()
    (ex,) = constructed_pairs(rollouts, 1)
    assert ex.source.endswith("conversation 1")  # the conversation without a sampled pair comes first
    conv = rollouts.conversations[1]
    assert ex.chosen[:-1] == ex.rejected[:-1] == rollouts.responses[1][0][:-1]
    assert ex.chosen[-1]["content"] == "Your favourite colour is blue."
    assert recalls(ex.chosen[-1]["content"], conv) and not recalls(ex.rejected[-1]["content"], conv)
    assert len(constructed_pairs(rollouts, 5)) == 2


# ---- masking policies ----


def test_sigmoid_dpo_is_invariant_on_shared_turns_and_simpo_is_not(tiny):
    """Shared turns add the same log-ratio to both sides of h = β(Δ_w − Δ_l), so sigmoid DPO's value and
    gradient cancel them; SimPO divides each side's sum by its own token count, which the extra turns change."""
    policy, reference, tok = tiny
    examples = constructed_pairs(hand_rollouts(), 2)
    rows = {r["loss"]: r for r in masking_invariance(policy, reference, tok, examples)}
    assert rows["sigmoid"]["final_turn"] != pytest.approx(math.log(2), abs=1e-3)  # away from θ = θ_ref
    assert rows["sigmoid"]["loss_difference"] < 1e-5
    assert rows["sigmoid"]["gradient_relative_difference"] < 1e-4
    assert rows["simpo"]["loss_difference"] > 1e-3 and rows["simpo"]["gradient_relative_difference"] > 1e-2


def test_train_with_mask_policy_smoke(tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("DPOLAB_CACHE", str(tmp_path))
    _, reference, tok = tiny
    examples = sampled_pairs(hand_rollouts())[0]
    runs = {m: train_with_mask_policy(reference, tok, examples, m, max_steps=2, micro_batch_size=2, grad_accum_steps=1,
                                   lr=1e-3, warmup_steps=0) for m in ("final_turn", "all_assistant")}
    for run in runs.values():
        assert len(run.history) == 2 and all(math.isfinite(r["loss"]) for r in run.history)
        assert run.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # θ = θ_ref at the first step
        assert 0.0 <= run.train_accuracy <= 1.0
    scored = {m: sum(sum(p.chosen_mask) for p in run.pairs) for m, run in runs.items()}
    assert scored["all_assistant"] > scored["final_turn"]
    assert not any(p.grad is not None for p in reference.parameters())


# ---- evaluation rows ----


def test_recall_row_standard_errors_by_hand(tmp_path):
    convs = [colour("green"), colour("blue")]
    side = (assistant("Blue is nice."), user("What is my favourite colour?"), assistant("x y"))
    a = Rollouts(convs, [[side] * 2] * 2, np.array([[1.0, 0], [1, 1]]), np.array([[True, False], [True, True]]))
    b = Rollouts(convs, [[side] * 2] * 2, np.zeros((2, 2)), np.array([[False, False], [True, False]]))
    row = recall_row("a", a, reference=b)
    assert row["answer_words"] == 2 and row["earlier_mentions"] == 0.5  # "Blue" names conversation 1's value
    # per conversation 0.5 and 1: mean 0.75, sd 0.3536, se 0.3536 / sqrt(2) = 0.25
    assert row["recall"] == pytest.approx(0.75) and row["recall_se"] == pytest.approx(0.25)
    # differences 0.5 - 0 and 1 - 0.5: mean 0.5, se 0
    assert row["recall_vs_reference"] == pytest.approx(0.5) and row["recall_vs_reference_se"] == pytest.approx(0.0)
    path = save_results({"rows": [row]}, str(tmp_path), "r.json")
    assert json.loads(path.read_text())["rows"][0]["recall"] == pytest.approx(0.75)


def test_bad_requests_name_the_argument(tiny):
    with pytest.raises(ValueError, match="split"):
        make_conversations(2, "test")
    with pytest.raises(ValueError, match="filler_turns"):
        make_conversations(2, "train", filler_turns=-1)
    mixed = make_conversations(1, "train", filler_turns=0) + make_conversations(1, "train", filler_turns=1)
    with pytest.raises(ValueError, match="same number of user turns"):
        rollout(tiny[0], tiny[2], mixed, 2, max_new_tokens=2)
