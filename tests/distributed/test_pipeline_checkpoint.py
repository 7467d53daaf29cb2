"""A checkpoint written under PP2 x FSDP2 resumes in other layouts (DCP reshards by parameter
name): the next step's loss and the parameters after it equal those of the pipeline run."""

import shutil

import torch

from tests.distributed.launcher import run_ranks
from tests.distributed.test_layouts import batches, config, merged, train_and_collect
from torchmoe.data.stdlib_docs import load_stdlib_docs
from torchmoe.train.trainer import Trainer

MODEL = {"model.n_layers": 4}


def test_pp2_x_fsdp2_checkpoint_resumes_single_process_and_ep2(tmp_path, data_cache):
    load_stdlib_docs(data_cache)
    data = batches(seed=1)
    seed = config(
        tmp_path / "pp", data_cache, **MODEL, **{"checkpoint.create_seed_checkpoint": "true"}
    )
    Trainer(seed, device=torch.device("cpu")).checkpoint.save_seed()
    pp = config(
        tmp_path / "pp",
        data_cache,
        dp=2,
        **MODEL,
        **{"parallelism.pp": 2, "checkpoint.interval": 2},
    )
    pp_losses, pp_params = merged(run_ranks(4, train_and_collect, pp, data))
    assert (tmp_path / "pp" / "ckpt" / "step-2").is_dir()

    # one process reads the data in another order: its position is not restored
    for name, world, layout in (
        ("single", 1, {"checkpoint.exclude_from_loading": "dataloader"}),
        ("ep2", 2, {"parallelism.ep": 2}),
    ):
        shutil.copytree(tmp_path / "pp" / "ckpt" / "step-2", tmp_path / name / "ckpt" / "step-2")
        cfg = config(tmp_path / name, data_cache, dp=world, **MODEL, **layout)
        losses, params = merged(run_ranks(world, train_and_collect, cfg, data[2:]))
        torch.testing.assert_close(losses, pp_losses[2:], rtol=1e-5, atol=1e-5)
        assert params.keys() == pp_params.keys()
        for key, ref in pp_params.items():
            torch.testing.assert_close(
                params[key],
                ref,
                rtol=1e-4,
                atol=5e-5,
                msg=lambda m, name=name, key=key: f"{name} {key}: {m}",
            )
