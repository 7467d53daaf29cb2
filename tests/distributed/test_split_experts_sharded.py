"""A checkpoint that stores the experts' gate and up apart resumes on sharded experts (DTensor
views of the joined tensor's halves: FSDP x EP shards dim 0, ETP dim 2) exactly as one of the
joined layout does (2 gloo ranks)."""

import pytest
import torch

from tests.distributed.launcher import run_ranks
from tests.train.test_split_experts_checkpoint import model_names, older_layout, split_shapes
from torchmoe.train.checkpoint_states import ModelAndOptimizer
from torchmoe.train.trainer import Trainer


def save_then_resume(rank: int, cfg4, cfg6, split: bool) -> list[float]:
    """Train 4 steps and save (as an older torchmoe did with ``split``), then resume to 6."""
    joined = ModelAndOptimizer.state_dict
    if split:  # a forked rank: the patch dies with it
        ModelAndOptimizer.state_dict = lambda s: older_layout(joined(s))
    trainer = Trainer(cfg4, device=torch.device("cpu"))
    if split:
        trainer.checkpoint.job["shapes"] = split_shapes(trainer.checkpoint.job["shapes"])
    trainer.train()
    ModelAndOptimizer.state_dict = joined
    return Trainer(cfg6, device=torch.device("cpu")).train()


def on_ranks(cfg, layout: dict[str, int]):
    """``cfg`` with parallel degrees set after validation (which counts this one process)."""
    for key, value in layout.items():
        setattr(cfg.parallelism, key, value)
    return cfg


@pytest.mark.parametrize("layout", [{"ep": 2}, {"etp": 2}])
def test_sharded_resume_of_an_older_checkpoint(layout, tiny_config, tmp_path):
    losses = {}
    for name in ("split", "joined"):
        cfgs = [
            on_ranks(
                tiny_config(
                    **{
                        "checkpoint.enable": "true",
                        "checkpoint.interval": "4",
                        "job.dump_folder": tmp_path / name,
                        "training.steps": steps,
                        "training.local_batch_size": 2,
                    }
                ),
                layout,
            )
            for steps in (4, 6)
        ]
        losses[name] = run_ranks(2, save_then_resume, *cfgs, name == "split")[0]
    assert len(losses["split"]) == 2
    assert losses["split"] == losses["joined"]
    # the run that resumed was saved apart
    assert any(n.endswith("experts.w1") for n in model_names(tmp_path / "split/checkpoint/step-4"))
