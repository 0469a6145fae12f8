"""LoRA through peft's own config: the config fields reach peft.LoraConfig, the adapter reference stays the base model
with DoRA and rsLoRA, LoRA dropout acts only in training steps, the saved adapter reloads (and merges) to the
trained model's log-probs, and a LoRA run resumes bit for bit."""

import copy
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from dpolab.data.batch import collate_pairs
from dpolab.data.prepare import prepare_pairs
from dpolab.data.tokenize import TokenizeConfig
from dpolab.logprobs import concatenated_forward
from dpolab.models import load_model
from dpolab.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, adapter_dropout, add_lora, attach_adapter
from dpolab.models.tiny import tiny_causal_lm
from dpolab.train import checkpoint as ckpt
from dpolab.train.config import ConfigError, TrainConfig
from dpolab.train.metrics import read_metrics
from dpolab.train.reference import AdapterReference, FrozenReference
from dpolab.train.trainer import train

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import KILLED_RUN, RESUME  # noqa: E402
from tiny_runs import FAST, make_examples  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(tokenizer, n=6):
    pairs = prepare_pairs(make_examples(n), tokenizer, TokenizeConfig(max_length=64)).pairs
    return collate_pairs(pairs, tokenizer.pad_token_id, index=list(range(n)))


def _logps(model, batch):
    with torch.no_grad():
        return concatenated_forward(model, batch)


def _moved_adapter(model, seed=1):
    """Give every adapter tensor a random value, so that the policy differs from its base (B ≠ 0, m ≠ ‖W‖)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.5 if "magnitude" in name else 0.0, 0.2, generator=torch.Generator().manual_seed(seed))
    return model


# ---- the config fields ------------------------------------------------------------------------------------------

def test_the_lora_fields_reach_peft(tmp_path):
    """r = 4, α = 8 with rsLoRA: scale α/√r = 4 (not α/r = 2); DoRA's magnitude, the dropout, the targets and the
    fully trained module are peft's own."""
    result = train({**FAST, "model": "tiny-llama", "max_steps": 1, "micro_batch_size": 4, "output_dir": str(tmp_path),
                    "lora_r": 4, "lora_alpha": 8.0, "lora_target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.25,
                    "use_rslora": True, "use_dora": True, "lora_modules_to_save": ["norm"]},
                   train_pairs=make_examples(8))
    peft_config = result.model.peft_config["default"]
    assert set(peft_config.target_modules) == {"q_proj", "v_proj"} and peft_config.lora_dropout == 0.25
    assert peft_config.use_rslora and peft_config.use_dora and peft_config.bias == "none"
    assert list(peft_config.modules_to_save) == ["norm"]
    q_proj = result.model.base_model.model.model.layers[0].self_attn.q_proj
    assert q_proj.scaling["default"] == pytest.approx(8.0 / math.sqrt(4))
    assert not hasattr(result.model.base_model.model.model.layers[0].self_attn.k_proj, "lora_A")
    trained = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any("lora_magnitude_vector" in n for n in trained) and any("modules_to_save" in n for n in trained)


def test_all_linear_is_peft_all_linear_and_the_default():
    model = add_lora(tiny_causal_lm("llama")[0], 4, 8.0, target_modules=TrainConfig().lora_target_modules)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}  # not lm_head


@pytest.mark.parametrize("fields, match", [
    ({"use_dora": True}, r"\['use_dora'\] set LoRA options but 'lora_r' is 0"),
    ({"lora_target_modules": ["q_proj"], "lora_dropout": 0.1}, r"\['lora_target_modules', 'lora_dropout'\]"),
    ({"lora_r": 4, "lora_dropout": 1.0}, r"'lora_dropout' must be in \[0, 1\)"),
    ({"lora_r": 4, "lora_bias": "all", "reference": "adapter"}, "trained biases stay when the adapter is switched off"),
    ({"lora_r": 4, "lora_bias": "true"}, "expects 'none' | 'all' | 'lora_only'"),
])
def test_lora_fields_that_cannot_work_are_refused(fields, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig.load(None, fields)


def test_lora_fields_read_from_the_command_line():
    config = TrainConfig.load(None, ["lora_r=8", "lora_target_modules=q_proj,v_proj", "lora_modules_to_save=lm_head",
                                     "lora_bias=lora_only", "use_rslora=true"])
    assert config.lora_target_modules == ["q_proj", "v_proj"] and config.lora_modules_to_save == ["lm_head"]
    assert config.lora_bias == "lora_only" and config.use_rslora


# ---- the reference and the dropout ------------------------------------------------------------------------------

@pytest.mark.parametrize("options", [{"use_dora": True}, {"use_rslora": True}, {"use_dora": True, "use_rslora": True,
                                                                                 "modules_to_save": ["norm"]}])
def test_the_adapter_switched_off_is_the_base_model_with_dora_and_rslora(options):
    base, tok = tiny_causal_lm("llama", seed=0)
    base.eval()
    batch = _batch(tok)
    want = FrozenReference(copy.deepcopy(base)).pair_logps(batch)
    policy = _moved_adapter(add_lora(base, 4, 8.0, **options)).eval()
    if "modules_to_save" in options:
        with torch.no_grad():  # the trained copy of the norm moves too; the reference keeps the original
            policy.base_model.model.model.norm.modules_to_save["default"].weight.mul_(1.5)
    assert not torch.allclose(_logps(policy, batch).chosen, want.chosen, atol=1e-3)
    got = AdapterReference(policy).pair_logps(batch)
    torch.testing.assert_close(got.chosen, want.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected, want.rejected, rtol=1e-5, atol=1e-5)


def test_a_dora_run_with_the_adapter_reference_starts_at_margin_zero(tmp_path):
    """π_θ = π_ref at step 0 (B = 0, DoRA's m = ‖W‖): every implicit reward of the first step is 0."""
    result = train({**FAST, "model": "tiny-llama", "max_steps": 1, "micro_batch_size": 4, "reference": "adapter",
                    "lora_r": 4, "use_dora": True, "use_rslora": True, "output_dir": str(tmp_path)},
                   train_pairs=make_examples(8))
    first = result.history[0]
    assert first["rewards/chosen"] == pytest.approx(0, abs=1e-6)
    assert first["rewards/margins"] == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_lora_dropout_acts_only_inside_a_training_step(use_dora):
    base, tok = tiny_causal_lm("llama", seed=0)
    batch = _batch(tok)
    policy = _moved_adapter(add_lora(base.eval(), 4, 8.0, dropout=0.5, use_dora=use_dora)).eval()
    off = _logps(policy, batch).chosen
    assert torch.equal(_logps(policy, batch).chosen, off)  # outside a step: deterministic
    reference = AdapterReference(policy)
    want_ref = reference.pair_logps(batch).chosen
    with adapter_dropout(policy):
        torch.manual_seed(0)
        on = _logps(policy, batch).chosen
        assert torch.equal(reference.pair_logps(batch).chosen, want_ref)  # π_ref: no dropout, no adapter
        torch.manual_seed(0)
        assert torch.equal(_logps(policy, batch).chosen, on)  # the reference left the dropout on
    assert not torch.allclose(on, off, atol=1e-4)
    assert not any(m.training for m in policy.modules())  # every mode restored
    assert torch.equal(_logps(policy, batch).chosen, off)


# ---- saving, reloading, merging ---------------------------------------------------------------------------------

@pytest.fixture(params=["gpt2", "llama"])
def base_folder(request, tmp_path):
    """A tiny model saved as a local folder, as a user's own model would be."""
    model, tok = tiny_causal_lm(request.param, seed=0)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    return request.param, tmp_path / "base"


LORA_OPTIONS = {  # GPT-2 has biases (lora_bias trains those of the adapted layers); Llama has none
    "gpt2": {"lora_target_modules": ["c_attn", "c_fc"], "lora_dropout": 0.1, "lora_bias": "lora_only"},
    "llama": {"use_dora": True, "use_rslora": True, "lora_modules_to_save": ["norm"], "lora_dropout": 0.1},
}


def test_a_lora_output_folder_reloads_to_the_trained_log_probs_and_merges(base_folder, tmp_path):
    kind, folder = base_folder
    result = train({**FAST, "model": str(folder), "lora_r": 4, "lora_alpha": 8.0, **LORA_OPTIONS[kind],
                    "max_steps": 3, "micro_batch_size": 4, "lr": 1e-2, "output_dir": str(tmp_path / "run")},
                   train_pairs=make_examples(12))
    out = result.checkpoint
    assert all((out / name).is_file() for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, "tokenizer.json"))
    assert not (out / "config.json").exists()  # transformers would read the peft-named model.safetensors as the base
    assert json.loads((out / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == str(folder.resolve())

    batch = _batch(result.tokenizer)
    trained = _logps(result.model.eval(), batch)
    base = load_model(str(folder))[0]
    assert not torch.allclose(_logps(base, batch).chosen, trained.chosen, atol=1e-3)  # the adapter did train

    reloaded, tokenizer = load_model(str(out))
    assert hasattr(reloaded, "disable_adapter") and tokenizer.get_vocab() == result.tokenizer.get_vocab()
    got = _logps(reloaded, batch)
    assert torch.equal(got.chosen, trained.chosen) and torch.equal(got.rejected, trained.rejected)
    assert {n for n, p in reloaded.named_parameters() if p.requires_grad} == \
        {n for n, p in result.model.named_parameters() if p.requires_grad}  # trains on as it was trained

    merged, _ = load_model(str(out), merge_lora=True)
    assert not hasattr(merged, "peft_config") and all(p.requires_grad for p in merged.parameters())
    got = _logps(merged, batch)
    torch.testing.assert_close(got.chosen, trained.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.rejected, trained.rejected, rtol=1e-5, atol=1e-5)


def test_peft_and_transformers_load_the_folder_too(base_folder, tmp_path):
    from peft import AutoPeftModelForCausalLM

    kind, folder = base_folder
    result = train({**FAST, "model": str(folder), "lora_r": 4, "max_steps": 1, "micro_batch_size": 4, "lr": 1e-2,
                    "output_dir": str(tmp_path / "run")}, train_pairs=make_examples(8))
    batch = _batch(result.tokenizer)
    want = _logps(result.model.eval(), batch).chosen
    loaded = AutoPeftModelForCausalLM.from_pretrained(result.checkpoint).eval()
    assert torch.equal(_logps(loaded, batch).chosen, want)


def test_a_lora_sft_folder_is_a_model_to_train_on_with_its_adapter_as_reference(tmp_path):
    """LoRA SFT, then LoRA DPO from its output folder (as from the command line): the adapter trains on, and π_ref
    is the SFT policy (the adapter at its starting weights), so the first DPO step's margins are 0."""
    model, tok = tiny_causal_lm("llama", seed=0)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    sft = train({**FAST, "stage": "sft", "model": str(tmp_path / "base"), "lora_r": 4, "use_dora": True, "lr": 1e-2,
                 "max_steps": 2, "micro_batch_size": 4, "output_dir": str(tmp_path / "sft")},
                train_pairs=make_examples(8))
    dpo = train({**FAST, "model": str(sft.checkpoint), "lora_r": 4, "reference": "adapter", "max_steps": 2,
                 "micro_batch_size": 4, "output_dir": str(tmp_path / "dpo")}, train_pairs=make_examples(8))
    assert dpo.history[0]["rewards/margins"] == pytest.approx(0, abs=1e-6) and dpo.history[0]["loss"] > 0
    assert dpo.history[-1]["rewards/margins"] != 0
    base = json.loads((dpo.checkpoint / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    assert base == str((tmp_path / "base").resolve())  # the adapter trained in both stages, on the same base


def test_a_missing_base_model_is_named_in_the_error(tmp_path):
    model, tok = tiny_causal_lm("gpt2", seed=0)
    model.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    result = train({**FAST, "model": str(tmp_path / "base"), "lora_r": 4, "max_steps": 1, "micro_batch_size": 4,
                    "output_dir": str(tmp_path / "run")}, train_pairs=make_examples(8))
    (tmp_path / "base").rename(tmp_path / "moved")
    with pytest.raises(FileNotFoundError, match="no such folder") as err:
        load_model(str(result.checkpoint))
    assert any("is the base model named in" in note and "adapter_config.json" in note for note in err.value.__notes__)


def test_an_adapter_on_an_in_memory_base_says_how_to_reload_it(tmp_path):
    result = train({**FAST, "lora_r": 4, "max_steps": 1, "micro_batch_size": 4, "lr": 1e-2,
                    "output_dir": str(tmp_path)}, train_pairs=make_examples(8))
    with pytest.raises(ValueError, match="names no base model .* dpolab.models.lora.attach_adapter"):
        load_model(str(result.checkpoint))
    batch = _batch(result.tokenizer)
    reloaded = attach_adapter(tiny_causal_lm("gpt2", seed=FAST.get("seed", 0))[0], result.checkpoint)
    assert torch.equal(_logps(reloaded, batch).chosen, _logps(result.model.eval(), batch).chosen)


# ---- resume -----------------------------------------------------------------------------------------------------

LORA_RESUME = {"lora_r": 4, "lora_dropout": 0.2, "use_rslora": True, "lora_target_modules": ["c_attn", "c_fc"],
               "reference": "adapter"}


def test_a_killed_and_resumed_lora_run_ends_bit_for_bit_equal_to_an_uninterrupted_one(tmp_path):
    """As test_trainer's resume test, with an adapter whose dropout draws from the saved generator state."""
    script = textwrap.dedent(KILLED_RUN.format(tests=str(Path(__file__).parent), out=str(tmp_path / "resumed"),
                                               extra=LORA_RESUME))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed")] == ["step-000002"]

    resumed = train({**RESUME, **LORA_RESUME, "output_dir": str(tmp_path / "resumed"), "resume_from": "auto"},
                    train_pairs=make_examples(20))
    straight = train({**RESUME, **LORA_RESUME, "output_dir": str(tmp_path / "straight")},
                     train_pairs=make_examples(20))
    a, b = resumed.model.state_dict(), straight.model.state_dict()
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    drop = {"tokens_per_s"}
    lines = [{k: v for k, v in r.items() if k not in drop} for r in read_metrics(tmp_path / "resumed/metrics.jsonl")]
    assert lines == [{k: v for k, v in r.items() if k not in drop} for r in straight.history]
    # the dropout acted: without it the same run ends elsewhere
    plain = train({**RESUME, **LORA_RESUME, "lora_dropout": 0.0, "output_dir": str(tmp_path / "plain")},
                  train_pairs=make_examples(20))
    assert plain.history[-1]["loss"] != straight.history[-1]["loss"]
