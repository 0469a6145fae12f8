"""`dpolab plan`: exact parameter counts from the meta device, the memory formulas by hand, and the fit verdict."""

import pytest

from dpolab.cli.plan import GB, activation_bytes, count_parameters, model_config, parse_memory, plan_config, report
from dpolab.data.cache import REPO_ROOT


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    import dpolab.models

    monkeypatch.setattr(dpolab.models, "hub_reachable", lambda timeout=3.0: False)


def test_parameter_count_is_the_models_own():
    from dpolab.models.tiny import tiny_causal_lm

    model, _ = tiny_causal_lm("gpt2")
    config, _ = model_config("tiny-gpt2")
    assert count_parameters(config) == (sum(p.numel() for p in model.parameters()),) * 2


def test_gpt2_large_from_the_known_table():
    """GPT-2 large has 774,030,080 parameters (tied output layer counted once)."""
    config, source = model_config("openai-community/gpt2-large")
    assert count_parameters(config)[0] == 774_030_080 and "KNOWN" in source


def test_memory_parts_by_hand(tmp_path):
    """tiny-gpt2 (P parameters, fp32), DPO, AdamW, reference copy: weights = gradients = reference = 4P bytes,
    optimizer 8P; activations per token and layer (17h + 4·4h + 5·a·s)·4/2 bytes."""
    path = tmp_path / "train.yaml"
    path.write_text("model: tiny-gpt2\nmicro_batch_size: 2\nmax_length: 32\nmax_prompt_length: 8\n")
    plan = plan_config(path)
    P, stage = plan.parameters, plan.stages[0]
    assert stage.parts["weights"] == stage.parts["gradients"] == stage.parts["reference"] == 4 * P
    assert stage.parts["optimizer state"] == 8 * P
    h, a, s, rows = 64, 4, 32, 4  # two pairs = four rows
    assert stage.parts["activations (one micro-batch)"] == rows * s * 2 * (17 * h + 16 * h + 5 * a * s) * 2
    dims = {"h": h, "i": 4 * h, "heads": a, "gated": False, "layers": 2}
    assert activation_bytes(dims, rows, s, 4, checkpointing=True) < stage.parts["activations (one micro-batch)"]


def test_paper_config_plan_and_fit_verdict():
    plan = plan_config(REPO_ROOT / "configs" / "paper_imdb_gpt2_large.yaml")
    assert plan.parameters == 774_030_080 and len(plan.stages) == 3
    text = report(plan, parse_memory("80GB"))
    assert "estimates, not measurements" in text and "fits in 80.0 GB" in text
    assert "does NOT fit in 24.0 GB" in report(plan, parse_memory("24GB"))


def test_parse_memory_and_cli(capsys):
    from dpolab.cli import main

    assert parse_memory("24GiB") == 24 * 2 ** 30 and parse_memory("80GB") == 80 * GB and parse_memory("512MB") == 512e6
    with pytest.raises(ValueError, match="expected e.g. 80GB"):
        parse_memory("lots")
    assert main(["plan", "--config", str(REPO_ROOT / "configs" / "paper_imdb_gpt2.yaml"), "--device-memory",
                 "24GB"]) == 0
    assert "124.4 M parameters" in capsys.readouterr().out
