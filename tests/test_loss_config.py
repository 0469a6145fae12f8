"""The loss fields named as trl names them: types checked on the way in, combinations checked at load."""

import pytest
import torch

from dpolab.baselines.unlikelihood import unlikelihood_loss
from dpolab.losses import LOSSES
from dpolab.train.config import ConfigError, TrainConfig, field_help

TRL_FIELDS = {"loss_type": [], "loss_weights": [], "use_weighting": False, "ld_alpha": None,
              "f_divergence_type": "reverse_kl", "f_alpha_divergence_coef": 0.5, "sync_ref_model": False,
              "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 512}


def test_defaults_are_trls_and_documented():
    config = TrainConfig()
    assert {name: getattr(config, name) for name in TRL_FIELDS} == TRL_FIELDS
    assert config.loss == "sigmoid"
    help_text = field_help()
    assert all(help_text[name][2].startswith("trl's name") for name in TRL_FIELDS)


def test_values_parse_as_trl_writes_them():
    config = TrainConfig.load(None, ["loss_type=[sigmoid, bco_pair, sft]", "loss_weights=[0.8, 0.2, 1.0]",
                                     "use_weighting=true", "ld_alpha=0.5", "f_alpha_divergence_coef=0.3"])
    assert config.loss_type == ["sigmoid", "bco_pair", "sft"] and config.loss_weights == [0.8, 0.2, 1.0]
    assert config.use_weighting is True and config.ld_alpha == 0.5
    assert TrainConfig.load(None, ["loss_type=ipo"]).loss_type == ["ipo"]  # trl accepts one name as a string
    assert TrainConfig.load(None, {"ld_alpha": None}).ld_alpha is None
    assert TrainConfig.load(None, ["ld_alpha=null"]).ld_alpha is None


@pytest.mark.parametrize(("overrides", "message"), [
    (["ld_alpha=abc"], "field 'ld_alpha' expects float"),
    (["use_weighting=1"], "field 'use_weighting' expects bool"),
    (["f_divergence_type=kl"], "field 'f_divergence_type' expects 'reverse_kl'"),
    (["loss_type=[dpo]"], "'loss_type': 'dpo' is not one of"),
    (["loss_type=[sigmoid, sft]", "loss_weights=[1.0]"], "has 1 entries for the 2 losses"),
    (["loss_type=[sigmoid]", "loss_weights=[x]"], "'loss_weights': 'x' is not a finite number"),
    (["loss=ipo", "loss_type=[sigmoid]"], "both name the loss"),
    (["ld_alpha=1.5"], "'ld_alpha' must be in [0, 1]"),
    (["ref_model_mixup_alpha=2"], "'ref_model_mixup_alpha' must be in [0, 1]"),
    (["ref_model_sync_steps=0"], "'ref_model_sync_steps' must be > 0"),
    (["loss=bco_pair", "f_divergence_type=js_divergence"], "defined only for the losses"),
    (["loss_type=[aot, sigmoid]", "use_weighting=true"], "does not combine with aot"),
    (["loss_type=[aot, aot_unpaired]"], "at most one of"),
    (["ld_alpha=0.5", "reference=precomputed"], "holds sums only"),
    (["sync_ref_model=true", "reference=precomputed"], "set reference 'copy'"),
    (["sync_ref_model=true", "lora_r=4"], "lora_r > 0"),
    (["sync_ref_model=true", "resume_from=auto"], "cannot be resumed"),
    (["loss_type=[sigmoid, hinge]", "reference=none"], "need reference log-probs"),
    (["loss_type=[hinge, sft]", "loss_params.gamma=1"], "takes ['gamma']"),
    (["loss_type=[robust, sft]", "loss_params.label_smoothing=0.7"], "flip rate"),
])
def test_bad_values_and_combinations_are_named(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        TrainConfig.load(None, overrides)


def test_unlikelihood_registered_equals_the_baseline_module():
    """The registered ``unlikelihood`` loss on sums + rejected-token log-probs equals dpolab.baselines.unlikelihood's."""
    g = torch.Generator().manual_seed(0)
    chosen = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    rejected = -torch.rand(3, 4, generator=g, dtype=torch.float64) * 2 - 0.01
    chosen_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    rejected_mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 0]])
    expected = unlikelihood_loss(chosen, chosen_mask, rejected, rejected_mask, alpha=0.7)
    got, _, _ = LOSSES["unlikelihood"](
        (chosen * chosen_mask).sum(-1), (rejected * rejected_mask).sum(-1), None, None, 0.1,
        rejected_token_logps=rejected, rejected_token_mask=rejected_mask, unlikelihood_alpha=0.7,
        chosen_lengths=chosen_mask.sum(-1), rejected_lengths=rejected_mask.sum(-1))
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
