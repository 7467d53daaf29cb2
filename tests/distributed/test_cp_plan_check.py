"""A custom plan that leaves attention without context parallelism under parallelism.cp > 1
would train each chunk on its own keys: the trainer refuses it in one line."""

import torch

from tests.distributed.launcher import run_ranks
from torchmoe.config.errors import ConfigError
from torchmoe.config.load import build_config
from torchmoe.train.trainer import Trainer


def _build(rank: int, folder: str, cache: str) -> str:
    values = {
        "job.dump_folder": folder,
        "data.cache_dir": cache,
        "training.seq_len": "32",
        "training.local_batch_size": "2",
        "model.dim": "64",
        "model.inter_dim": "128",
        "moe.ffn_hidden_size": "32",
        "moe.shared_expert_intermediate_size": "32",
        "parallelism.cp": "2",
        "parallelism.plan": "tests.parallel.custom_plan:fsdp_only",
    }
    try:
        Trainer(build_config({}, list(values.items())), device=torch.device("cpu"))
    except ConfigError as e:
        return str(e)
    return "no error"


def test_a_plan_without_context_parallelism_is_refused(tmp_path, data_cache):
    messages = run_ranks(2, _build, str(tmp_path / "run"), data_cache)
    for message in messages:
        assert "did not apply context parallelism to" in message, message
        assert "layers.0.attention" in message and "apply_cp" in message
        assert "\n" not in message
