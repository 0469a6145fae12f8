"""The benchmark's workloads: one model, one tokenizer and one list of tokenized pairs, written to a folder.

Both trainers read the same folder, so they start from the same weights and train on the same pairs:

- ``tiny``: a randomly initialised GPT-2 (4 layers, width 256, vocabulary 8192, context 512) and 512
  synthetic pairs (prompts 48–80 tokens, responses 64–192 tokens with EOS). The tokenizer is a
  word-level one whose words are ``t1 … t8191``, so text and token ids map one to one and trl's own
  tokenization of the text gives exactly the ids dpolab is handed.
- ``smollm``: the embedded SmolLM2-135M-Instruct (:func:`dpolab.models.default_model_dir`) on short
  sentiment pairs cut from the Rotten Tomatoes snippets: a 2–8-word prefix as the prompt, the rest of a
  positive snippet as chosen and of a negative one as rejected (at most 24 tokens plus EOS), as in the
  flagship experiment.

The reference π_ref is the policy's initial weights plus a small seeded perturbation (``reference/``), given
explicitly to both trainers. The cost is the same as a copy of the policy, but log π_θ − log π_ref is not zero
at step 1, so the first-step losses compared in the table are not the trivial log 2.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

EOS = "<eos>"


@dataclass
class Workload:
    """A prepared workload folder and what the table needs to know about it."""

    name: str
    folder: Path
    num_pairs: int
    matmul_params: int  # parameters that take part in matrix multiplies (embedding lookups excluded)

    @property
    def policy_dir(self) -> Path:
        return Path(json.loads((self.folder / "workload.json").read_text())["policy_dir"])

    @property
    def reference_dir(self) -> Path:
        return self.folder / "reference"

    @property
    def tokenizer_dir(self) -> Path:
        return self.folder / "tokenizer"

    def pairs(self) -> list[dict]:
        """Records with ``prompt``, ``chosen``, ``rejected`` (text) and ``prompt_ids``, ``chosen_ids``,
        ``rejected_ids`` (the token ids the text tokenizes to)."""
        return json.loads((self.folder / "pairs.json").read_text())


def word_tokenizer(vocab_size: int):
    """A word-level fast tokenizer over ``<eos> t1 … t{V-1}``: each space-separated word is one id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS: 0, **{f"t{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS, pad_token=EOS, bos_token=EOS)
    tok.model_input_names = ["input_ids", "attention_mask"]
    return tok


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters used in matrix multiplies: all of them except embedding tables that are only looked up.

    A tied input/output embedding counts once (it is the LM head's matrix); position embeddings do not count.
    """
    head = model.get_output_embeddings().weight
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)} - {id(head)}
    return sum(p.numel() for p in model.parameters() if id(p) not in lookups)


def perturbed_reference(model: torch.nn.Module, folder: Path, *, scale: float = 0.02, seed: int = 1) -> None:
    """Save ``model`` with every floating weight w replaced by w + scale·std(w)·ε (ε seeded normal) to ``folder``."""
    import copy

    reference = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in reference.parameters():
            std = float(p.std()) if p.numel() > 1 else 0.0
            p.add_(torch.randn(p.shape, generator=generator) * (scale * std))
    reference.save_pretrained(folder, safe_serialization=True)


def prepare_tiny(folder: Path, *, num_pairs: int = 512, num_layers: int = 4, hidden: int = 256, vocab: int = 8192,
                 context: int = 512, prompt_range=(48, 80), response_range=(64, 192), seed: int = 0) -> Workload:
    """Write the tiny GPT-2 workload (model, perturbed reference, tokenizer, synthetic pairs) into ``folder``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = word_tokenizer(vocab)
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=context, n_embd=hidden, n_layer=num_layers,
                        n_head=max(1, hidden // 64), resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder / "policy", safe_serialization=True)
    perturbed_reference(model, folder / "reference")
    tokenizer.save_pretrained(folder / "tokenizer")

    rng = random.Random(seed)

    def words(n: int) -> list[int]:
        return [rng.randrange(1, vocab) for _ in range(n)]

    records = []
    for _ in range(num_pairs):
        prompt = words(rng.randint(*prompt_range))
        chosen = words(rng.randint(*response_range) - 1) + [0]
        rejected = words(rng.randint(*response_range) - 1) + [0]
        records.append(_record(tokenizer, prompt, chosen, rejected))
    return _finish(folder, "tiny", folder / "policy", records, model)


def _record(tokenizer, prompt: list[int], chosen: list[int], rejected: list[int]) -> dict:
    text = tokenizer.convert_ids_to_tokens
    return {"prompt": " ".join(text(prompt)), "chosen": " " + " ".join(text(chosen)),
            "rejected": " " + " ".join(text(rejected)), "prompt_ids": prompt, "chosen_ids": chosen,
            "rejected_ids": rejected}


def prepare_smollm(folder: Path, *, num_pairs: int = 256, max_response_tokens: int = 24, seed: int = 0) -> Workload:
    """Write the SmolLM2-135M sentiment workload (perturbed reference, tokenizer, pairs) into ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dpolab.models import default_model_dir
    from dpolab.sample.sentiment import review_snippets

    folder.mkdir(parents=True, exist_ok=True)
    policy_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    tokenizer.save_pretrained(folder / "tokenizer")
    model = AutoModelForCausalLM.from_pretrained(policy_dir, dtype=torch.float32)
    perturbed_reference(model, folder / "reference")

    snippets = review_snippets()
    texts, ratings = snippets["text"], snippets["human_rating"]
    positive = [t for t, r in zip(texts, ratings) if r >= 1.5]
    negative = [t for t, r in zip(texts, ratings) if r <= -1.5]
    rng = random.Random(seed)
    eos = tokenizer.eos_token
    records = []
    while len(records) < num_pairs:
        words = rng.choice(texts).split()
        prompt = " ".join(words[: rng.randint(2, 8)])
        prompt_ids = tokenizer(prompt)["input_ids"]
        sides = []
        for pool in (positive, negative):
            tail = rng.choice(pool).split()[rng.randint(2, 8):]
            while tail:  # drop words from the end until the response fits
                text = " " + " ".join(tail) + eos
                ids = tokenizer(prompt + text)["input_ids"]
                if len(ids) - len(prompt_ids) <= max_response_tokens + 1:
                    sides.append((text, ids))
                    break
                tail = tail[:-1]
        if len(sides) < 2 or not all(ids[: len(prompt_ids)] == prompt_ids for _, ids in sides):
            continue  # an empty side, or the prompt's last token merges with the response: skip, never repair
        (chosen, chosen_full), (rejected, rejected_full) = sides
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "prompt_ids": prompt_ids,
                        "chosen_ids": chosen_full[len(prompt_ids):], "rejected_ids": rejected_full[len(prompt_ids):]})
    return _finish(folder, "smollm", policy_dir, records, model)


def _finish(folder: Path, name: str, policy_dir: Path, records: list[dict], model) -> Workload:
    (folder / "pairs.json").write_text(json.dumps(records))
    params = matmul_params(model)
    (folder / "workload.json").write_text(json.dumps({"name": name, "policy_dir": str(policy_dir),
                                                      "num_pairs": len(records), "matmul_params": params}))
    return Workload(name, folder, len(records), params)


def load_workload(folder: Path) -> Workload:
    """The :class:`Workload` written into ``folder`` by one of the ``prepare_*`` functions."""
    info = json.loads((Path(folder) / "workload.json").read_text())
    return Workload(info["name"], Path(folder), info["num_pairs"], info["matmul_params"])


def pair_tokens(record: dict) -> int:
    """Non-padding tokens a pair puts into a batch: prompt + chosen and prompt + rejected."""
    return 2 * len(record["prompt_ids"]) + len(record["chosen_ids"]) + len(record["rejected_ids"])


def prepare(name: str, folder: Path, num_pairs: int) -> Workload:
    """Write the workload ``name`` (``"tiny"`` or ``"smollm"``) with ``num_pairs`` pairs into ``folder``."""
    if name == "tiny":
        return prepare_tiny(folder, num_pairs=num_pairs)
    return prepare_smollm(folder, num_pairs=num_pairs)


def tokenized_pairs(workload: Workload) -> list:
    """The workload's pairs as dpolab's :class:`~dpolab.data.tokenize.TokenizedPair` (every response token scored)."""
    from dpolab.data.tokenize import TokenizedPair

    return [TokenizedPair(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"], [1] * len(r["chosen_ids"]),
                          [1] * len(r["rejected_ids"])) for r in workload.pairs()]
