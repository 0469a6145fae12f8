"""TrainConfig: defaults, YAML + key=value overrides with type checks, errors that name the key, field help."""

import dataclasses

import pytest

from dpolab.cli import main
from dpolab.train.config import ConfigError, TrainConfig, field_help


def test_defaults_are_a_small_cpu_dpo_run():
    config = TrainConfig()
    assert config.stage == "dpo" and config.device == "auto" and config.precision == "fp32"
    assert config.max_steps * config.micro_batch_size * config.grad_accum_steps <= 512  # tens of steps, small batches
    config.validate()


def test_yaml_then_overrides_in_order(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.5\nlr: 1e-5\noptimizer: rmsprop\nloss_params: {label_smoothing: 0.1}\nmax_steps: 3\n")
    config = TrainConfig.load(path, ["beta=0.25", "output_dir=2024", "progress=false",
                                    "loss_params.label_smoothing=0.2"])
    assert config.beta == 0.25  # the override wins over the file
    assert config.lr == 1e-5 and isinstance(config.lr, float)  # YAML 1.1 reads "1e-5" as text; accepted as float
    assert config.optimizer == "rmsprop" and config.max_steps == 3 and config.progress is False
    assert config.output_dir == "2024"  # a str field keeps the text, not YAML's int
    assert config.loss_params == {"label_smoothing": 0.2}  # names are checked against the loss (issue 20)
    assert TrainConfig.load(None, {"max_steps": 7, "warmup_steps": 0}).max_steps == 7


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert TrainConfig.load(None, ["beta=1"]).beta == 1.0
    with pytest.raises(ConfigError, match="'max_steps' expects int, got float 2.5"):
        TrainConfig.load(None, ["max_steps=2.5"])
    with pytest.raises(ConfigError, match="'max_steps' expects int, got bool"):
        TrainConfig.load(None, {"max_steps": True})


@pytest.mark.parametrize(
    "override, message",
    [
        ("lrr=0.1", r"'lrr' is not a TrainConfig field \(did you mean 'lr'\?\)"),
        ("beta=high", r"field 'beta' expects float, got str 'high'"),
        ("optimizer=sgd", r"field 'optimizer' expects 'adamw' \| 'rmsprop', got str 'sgd'"),
        ("progress=maybe", r"field 'progress' expects bool"),
        ("beta", r"not of the form key=value"),
        ("micro_batch_size=0", r"'micro_batch_size' must be > 0"),
        ("loss=nope", r"'loss': 'nope' is not one of"),
        ("reference=adapter", r"needs a LoRA adapter"),
    ],
)
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(None, [override])


def test_bad_yaml_key_names_the_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("beta: 0.1\nwarmup: 3\n")
    with pytest.raises(ConfigError, match=rf"{path}: 'warmup' is not a TrainConfig field \(did you mean 'warmup_steps'"):
        TrainConfig.load(path)
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        TrainConfig.load(path)


def test_replace_type_checks_and_round_trips_through_dict():
    config = TrainConfig().replace(beta=0.3, stage="sft")
    assert config.beta == 0.3 and config.stage == "sft"
    assert TrainConfig.load(None, config.to_dict()) == config
    with pytest.raises(ConfigError, match="'seed' expects int"):
        config.replace(seed="zero")


def test_every_field_has_help_text():
    help_ = field_help()
    assert set(help_) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert all(comment for _, _, comment in help_.values()), [k for k, v in help_.items() if not v[2]]
    assert help_["beta"] == ("float", "0.1", "β, the strength of the KL constraint to the reference (paper Eq. 3, 7).")


def test_cli_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for name in field_help():
        assert f"\n  {name} (" in text, name
    assert "β, the strength of the KL constraint" in text


def test_cli_rejects_a_bad_key_before_any_work(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("beta: 0.2\n")
    with pytest.raises(SystemExit) as exit_:
        main(["train", str(path), "max_step=3"])
    assert exit_.value.code == 2
    assert "'max_step' is not a TrainConfig field (did you mean 'max_steps'?)" in capsys.readouterr().err
    assert main(["train", str(path), "lr=1e-4", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert '"beta": 0.2' in printed and '"lr": 0.0001' in printed


def test_list_fields_take_a_comma_list_too():
    """The one override syntax of every config (dpolab.train.overrides): a list field takes [a, b] or a,b."""
    config = TrainConfig.load(None, ["loss_type=sigmoid,sft", "loss_weights=0.8,1", "report_to=jsonl"])
    assert config.loss_type == ["sigmoid", "sft"] and config.loss_weights == [0.8, 1] and config.report_to == ["jsonl"]
    assert config == TrainConfig.load(None, ["loss_type=[sigmoid, sft]", "loss_weights=[0.8, 1]"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["load_best_model_at_end=true", "eval_every=2", "save_every=3"],
         r"load_best_model_at_end needs 'save_every' \(3\) to be a positive multiple of 'eval_every' \(2\)"),
        (["load_best_model_at_end=true", "eval_every=2"], r"'save_every' \(0\) to be a positive multiple"),
        (["load_best_model_at_end=true", "fsdp=true"], "not supported with fsdp"),
        (["early_stopping_patience=2"], r"early_stopping_patience needs evaluations during the run: set 'eval_every'"),
        (["early_stopping_patience=-1"], r"'early_stopping_patience' must be >= 0"),
        (["early_stopping_threshold=-0.1"], r"'early_stopping_threshold' must be >= 0"),
        (["greater_is_better=maybe"], r"field 'greater_is_better' expects"),
    ],
)
def test_best_model_and_early_stopping_fields_follow_hf_rules(overrides, message):
    """HF's TrainingArguments names and checks: every checkpoint of load_best_model_at_end has its evaluation."""
    with pytest.raises(ConfigError, match=message):
        TrainConfig.load(None, overrides)
    config = TrainConfig.load(None, ["load_best_model_at_end=true", "eval_every=2", "save_every=4",
                                     "early_stopping_patience=2", "greater_is_better=null"])
    assert config.metric_for_best_model == "eval_loss" and config.greater_is_better is None
    assert TrainConfig.load(None, ["load_best_model_at_end=true", "save_every=3"]).eval_every == 0  # evaluated at the end
