"""A multi-turn task whose reward depends on an early turn: recalling a fact the user stated.

The user states a fact in turn 1 ("My favourite colour is green. Tell me a fun fact."), the assistant replies,
the conversation goes on for ``filler_turns`` more exchanges, then the user asks about the fact ("What is my
favourite colour?"). The rule reward of the final assistant reply y is

    r(y) = 1[y states the right value and no other value of the slot] · max(0, 1 − λ · words(y)),

in [0, 1]; λ (``length_penalty``) makes a shorter correct answer slightly better. Facts come in four slots
(colour, name, city, dog) with several phrasings; the values are split so held-out conversations use values
that never occur in training.

Preference pairs are labelled by this rule (DPO paper §6.1 labels samples with a known reward the same way):
each training conversation is rolled out ``n`` times by π_ref, turn by turn, and two rollouts of the same
conversation become a pair when their rewards differ. The prompt is the opening user turn and the response
side holds every later turn, [assistant, (user, assistant)*, user question, assistant answer], so the masking
policy of :mod:`dpolab.data.tokenize` matters: ``final_turn`` scores the answer, ``all_assistant`` every assistant
turn. :func:`constructed_pairs` adds pairs built directly (the canonical correct answer against a wrong value)
that share every turn but the last, where sigmoid DPO is invariant to the masking policy and a
length-normalised loss is not (:func:`dpolab.experiments.multiturn_dpo.masking_invariance`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np

from dpolab.data.cache import atomic_write_text, from_repo_root
from dpolab.data.records import Message, PreferenceExample
from dpolab.experiments.sentiment.evaluation import mean_and_se
from dpolab.sample.generate import sample
from dpolab.sample.pairs import build_pairs

SPLITS = ("train", "eval")


@dataclass(frozen=True)
class Slot:
    """One kind of fact: how the user states it and asks for it, the canonical answer, the possible values."""

    statements: tuple[str, ...]
    questions: tuple[str, ...]
    answer: str
    values: tuple[str, ...]

    def split(self, name: str) -> tuple[str, ...]:
        """Values of a split: even positions train, odd positions are held out (never seen in training)."""
        if name not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {name!r}")
        return self.values[SPLITS.index(name)::2]


SLOTS = {
    "colour": Slot(("My favourite colour is {}.", "I really love the colour {}."),
                   ("What is my favourite colour?", "Do you remember my favourite colour?"),
                   "Your favourite colour is {}.",
                   ("green", "blue", "red", "yellow", "purple", "orange", "pink", "silver", "brown", "turquoise")),
    "name": Slot(("My name is {}.", "Hi, I'm {}."), ("What is my name?", "Do you remember my name?"),
                 "Your name is {}.",
                 ("Maria", "David", "Aisha", "Tom", "Elena", "Kenji", "Sofia", "Omar", "Lucy", "Pablo", "Priya", "Lars")),
    "city": Slot(("I live in {}.", "My home is in {}."), ("Which city do I live in?", "Where do I live?"),
                 "You live in {}.",
                 ("Lisbon", "Paris", "Tokyo", "Cairo", "Toronto", "Berlin", "Madrid", "Sydney", "Nairobi", "Oslo",
                  "Lima", "Seoul")),
    "dog": Slot(("My dog is called {}.", "I have a dog named {}."), ("What is my dog called?", "What is my dog's name?"),
                "Your dog is called {}.",
                ("Rex", "Bella", "Biscuit", "Luna", "Daisy", "Rocky", "Milo", "Coco", "Pepper", "Buddy")),
}
REQUESTS = ("Can you suggest a hobby for me?", "Any tips for sleeping better?", "Tell me a fun fact.",
            "What should I cook tonight?", "How can I stay focused at work?", "Recommend a good book.")
EMPTY_REPLY = "..."  # stands in for a reply that ended at once (a message may not be empty)


def user(text: str) -> Message:
    """A user message."""
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    """An assistant message; surrounding whitespace is dropped and an empty reply becomes :data:`EMPTY_REPLY`."""
    return {"role": "assistant", "content": text.strip() or EMPTY_REPLY}


@dataclass(frozen=True)
class Conversation:
    """The user's side of one conversation: the fact, the opening turn, the filler requests, the question."""

    slot: str
    value: str
    opening: tuple[Message, ...]
    fillers: tuple[str, ...]
    question: str

    @property
    def later_user_turns(self) -> tuple[str, ...]:
        """The user turns after the opening, in order; the last one asks for the fact."""
        return (*self.fillers, self.question)


def make_conversations(n: int, split: str, *, filler_turns: int = 0, seed: int = 0) -> list[Conversation]:
    """``n`` conversations of a split, the slots in turn, value and phrasings drawn from a seeded generator."""
    if n < 1 or filler_turns < 0 or filler_turns >= len(REQUESTS):
        raise ValueError(f"need n >= 1 and 0 <= filler_turns < {len(REQUESTS)}, got n={n}, filler_turns={filler_turns}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = np.random.default_rng([seed, SPLITS.index(split)])
    names, out = list(SLOTS), []
    for i in range(n):
        name = names[i % len(names)]
        slot = SLOTS[name]
        value = str(rng.choice(slot.split(split)))
        requests = [REQUESTS[j] for j in rng.permutation(len(REQUESTS))[:filler_turns + 1]]
        statement = str(rng.choice(slot.statements)).format(value)
        out.append(Conversation(name, value, (user(f"{statement} {requests[0]}"),), tuple(requests[1:]),
                                str(rng.choice(slot.questions))))
    return out


def _mentions(text: str, value: str) -> bool:
    return re.search(rf"\b{re.escape(value)}\b", text, flags=re.IGNORECASE) is not None


def recalls(reply: str, conversation: Conversation) -> bool:
    """True when the reply names the conversation's value and no other value of its slot."""
    others = [v for v in SLOTS[conversation.slot].values if v != conversation.value]
    return _mentions(reply, conversation.value) and not any(_mentions(reply, v) for v in others)


def recall_reward(reply: str, conversation: Conversation, length_penalty: float = 0.01) -> float:
    """The rule reward in [0, 1]: 1[recalls] · max(0, 1 − length_penalty · words)."""
    if length_penalty < 0:
        raise ValueError(f"length_penalty must be >= 0, got {length_penalty}")
    return float(recalls(reply, conversation)) * max(0.0, 1.0 - length_penalty * len(reply.split()))


@dataclass
class Rollouts:
    """``n`` rollouts of each conversation: ``responses[c][i]`` is every turn after the opening."""

    conversations: list[Conversation]
    responses: list[list[tuple[Message, ...]]]
    rewards: np.ndarray  # (C, n)
    correct: np.ndarray  # (C, n) bool

    def answers(self) -> list[list[str]]:
        """The final assistant reply of every rollout."""
        return [[side[-1]["content"] for side in row] for row in self.responses]


def rollout(model, tokenizer, conversations: list[Conversation], n: int, *, max_new_tokens: int,
            temperature: float = 1.0, seed: int = 0, length_penalty: float = 0.01, batch_size: int = 16) -> Rollouts:
    """Play every conversation ``n`` times: the model samples each assistant turn, the user turns are fixed.

    The first assistant turn is sampled ``n`` times per conversation; each later turn once per rollout, given
    that rollout's history. Turn k draws with seed ``seed * 100 + k`` (rows seeded by conversation and rollout,
    see :func:`dpolab.sample.generate.sample`), so two models rolled out with the same seed share random numbers.
    """
    turns = {len(c.later_user_turns) for c in conversations}
    if len(turns) != 1:
        raise ValueError(f"conversations rolled out together need the same number of user turns, got {sorted(turns)}")
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=len(tokenizer), batch_size=batch_size,
              chat=True, progress=False)
    first = sample(model, tokenizer, [list(c.opening) for c in conversations], n, seed=seed * 100, **kw)
    sides = [[[assistant(t)] for t in row] for row in first.texts]
    flat = [(c, i) for c in range(len(conversations)) for i in range(n)]
    for k in range(len(conversations[0].later_user_turns)):
        for c, i in flat:
            sides[c][i].append(user(conversations[c].later_user_turns[k]))
        prompts = [list(conversations[c].opening) + sides[c][i] for c, i in flat]
        replies = sample(model, tokenizer, prompts, 1, seed=seed * 100 + k + 1, **kw).texts
        for (c, i), reply in zip(flat, replies):
            sides[c][i].append(assistant(reply[0]))
    responses = [[tuple(side) for side in row] for row in sides]
    answers = [[side[-1]["content"] for side in row] for row in responses]
    rewards = np.array([[recall_reward(a, c, length_penalty) for a in row] for c, row in zip(conversations, answers)])
    correct = np.array([[recalls(a, c) for a in row] for c, row in zip(conversations, answers)])
    return Rollouts(conversations, responses, rewards, correct)


def sampled_pairs(rollouts: Rollouts, strategy: str = "all_pairs", seed: int = 0):
    """Pairs of rollouts of the same conversation whose rewards differ, via :func:`dpolab.sample.pairs.build_pairs`.

    The pair builder treats a completion as opaque text, so it is handed each rollout's response side as JSON
    and the chosen one is decoded again. Returns ``(examples, stats)``.
    """
    prompts = [json.dumps(c.opening) for c in rollouts.conversations]
    completions = [[json.dumps(side) for side in row] for row in rollouts.responses]
    dataset, stats = build_pairs(prompts, completions, rollouts.rewards, strategy, seed)
    examples = [PreferenceExample(tuple(json.loads(r["prompt"])), tuple(json.loads(r["chosen"])),
                                  tuple(json.loads(r["rejected"])), source=f"sampled recall pairs:row {k}")
                for k, r in enumerate(dataset)]
    return examples, stats


def constructed_pairs(rollouts: Rollouts, k: int, seed: int = 0) -> list[PreferenceExample]:
    """``k`` pairs built directly: the canonical correct answer over the same answer with a wrong training value.

    Both sides keep rollout 0's earlier turns, so they differ only in the final answer. Conversations whose
    rollouts gave no sampled pair (all rewards equal) are used first.
    """
    rng = np.random.default_rng([seed, 7])
    order = sorted(range(len(rollouts.conversations)), key=lambda c: bool(np.ptp(rollouts.rewards[c]) > 0))
    out = []
    for c in order[:k]:
        conv, shared = rollouts.conversations[c], rollouts.responses[c][0][:-1]
        slot = SLOTS[conv.slot]
        wrong = str(rng.choice([v for v in slot.split("train") if v != conv.value]))
        out.append(PreferenceExample(conv.opening, (*shared, assistant(slot.answer.format(conv.value))),
                                     (*shared, assistant(slot.answer.format(wrong))),
                                     source=f"constructed recall pairs:conversation {c}"))
    return out


def recall_row(name: str, rollouts: Rollouts, reference: Rollouts | None = None) -> dict:
    """Recall rate and mean reward with standard errors over conversations (rollouts of one conversation are
    averaged first, as they are not independent); with ``reference``, the paired difference in recall.
    ``earlier_mentions`` is the share of rollouts whose earlier assistant turns already name the value."""
    per_conv = rollouts.correct.mean(1)
    recall, recall_se = mean_and_se(per_conv)
    reward, reward_se = mean_and_se(rollouts.rewards.mean(1))
    earlier = [any(_mentions(m["content"], conv.value) for m in side[:-1] if m["role"] == "assistant")
               for conv, row in zip(rollouts.conversations, rollouts.responses) for side in row]
    row = {"policy": name, "recall": recall, "recall_se": recall_se, "reward": reward, "reward_se": reward_se,
           "answer_words": float(np.mean([len(a.split()) for r in rollouts.answers() for a in r])),
           "earlier_mentions": float(np.mean(earlier)),
           "n_conversations": len(per_conv), "n_samples": int(rollouts.correct.size)}
    if reference is not None:
        row["recall_vs_reference"], row["recall_vs_reference_se"] = mean_and_se(per_conv - reference.correct.mean(1))
    return row


def save_results(results: dict, folder: str = "runs/models_multiturn", name: str = "04_multi_turn.json"):
    """Write the results (config, rows, invariance check) as JSON under ``folder`` (from the repository root)."""
    path = from_repo_root(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=2, default=float) + "\n")
    return path
