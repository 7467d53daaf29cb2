"""parallelism.plan swaps the parallelize function without touching torchmoe."""

import pytest
import torch

from tests.parallel import custom_plan
from torchmoe.config.errors import ConfigError
from torchmoe.parallel.plans import load_plan
from torchmoe.train.trainer import Trainer


def test_trainer_uses_the_configured_plan(tiny_config):
    custom_plan.CALLS.clear()
    cfg = tiny_config(
        **{"parallelism.plan": "tests.parallel.custom_plan:my_parallelize", "training.steps": 1}
    )
    Trainer(cfg, device=torch.device("cpu")).train()
    assert custom_plan.CALLS == [1]


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("no_colon", "must look like 'package.module:function'"),
        ("not_a_module_xyz:f", "cannot import 'not_a_module_xyz'"),
        ("tests.parallel.custom_plan:missing", "has no function 'missing'"),
    ],
)
def test_bad_plan_is_one_clear_line(spec, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        load_plan(spec)
    assert "\n" not in str(err.value)


def test_a_plan_that_copies_the_model_is_one_clear_line(tiny_config):
    cfg = tiny_config(**{"parallelism.plan": "tests.parallel.custom_plan:copying_parallelize"})
    with pytest.raises(ConfigError, match="must transform the model's modules in place") as err:
        Trainer(cfg, device=torch.device("cpu"))
    assert "\n" not in str(err.value)
