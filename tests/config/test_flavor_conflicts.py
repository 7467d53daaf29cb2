import logging

import pytest

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import build_config
from torchmoe.config.validate import validate


@pytest.mark.parametrize("flavor", ["debug", "16B"])
def test_flavor_keys_give_way_to_the_users_balancing_choice(flavor, caplog):
    with caplog.at_level(logging.INFO):
        cfg = build_config({}, [("model.flavor", flavor), ("moe.load_balancing_type", "sinkhorn")])
    validate(cfg)  # runs in one go: no key left to change
    assert cfg.moe.load_balancing_type == ["sinkhorn"]
    assert not cfg.moe.enable_expert_bias and cfg.moe.router_num_groups == 0
    assert all(c == 0 for c in cfg.moe.aux_loss_coeff)
    [line] = [r.getMessage() for r in caplog.records if "overrides the flavor" in r.getMessage()]
    assert line.startswith('moe.load_balancing_type = ["sinkhorn"] (yours) overrides')
    assert "moe.enable_expert_bias = true -> false" in line


def test_keys_the_user_set_too_are_listed_in_one_error():
    with pytest.raises(ConfigError) as err:
        build_config(
            {},
            [
                ("moe.load_balancing_type", "sinkhorn"),
                ("moe.aux_loss_coeff", "0.01"),
                ("moe.enable_expert_bias", "true"),
            ],
        )
    message = str(err.value)
    assert message.startswith('moe.load_balancing_type = ["sinkhorn"] needs ')
    assert "moe.aux_loss_coeff = [0.0] (you set [0.01])" in message
    assert "moe.enable_expert_bias = false (you set true)" in message
    assert "\n" not in message


def test_the_flavors_own_choice_is_untouched():
    cfg = build_config({}, [("model.flavor", "671B")])
    assert cfg.moe.enable_expert_bias and cfg.moe.router_num_groups > 0


def test_a_user_key_that_already_fits_is_not_a_conflict():
    cfg = build_config(
        {},
        [
            ("model.flavor", "671B"),
            ("moe.load_balancing_type", "sinkhorn"),
            ("moe.router_num_groups", "0"),  # yours, and right: the flavor's group_topk gives way
        ],
    )
    validate(cfg)
    assert cfg.moe.router_num_groups == cfg.moe.router_group_topk == 0
