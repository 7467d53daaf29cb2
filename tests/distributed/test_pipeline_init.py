"""Without a seed checkpoint each pipeline stage's blocks start from their own weights: each
parameter is drawn by name (named_init.py), not from one stream that every stage restarts."""

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from tests.distributed.launcher import run_ranks
from torchmoe.config.load import build_config
from torchmoe.data.stdlib_docs import load_stdlib_docs
from torchmoe.train.trainer import Trainer


def first_block_weight(rank: int, cfg) -> tuple[str, torch.Tensor]:
    trainer = Trainer(cfg, device=torch.device("cpu"))
    weights = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    first = min(trainer.model.layers.keys(), key=int)
    name = f"layers.{first}.attention.wkv_a.weight"
    return name, weights[name]


def test_stages_start_from_different_weights(tmp_path, data_cache):
    load_stdlib_docs(data_cache)
    cfg = build_config(
        {},
        [
            ("job.dump_folder", str(tmp_path)),
            ("data.cache_dir", data_cache),
            ("parallelism.pp", "3"),
            ("model.n_layers", "3"),
            ("training.local_batch_size", "3"),
            ("training.seq_len", "32"),
        ],
    )
    # stages 1 and 2 have no embedding: their first block is the first thing they initialise
    _, (name1, w1), (name2, w2) = run_ranks(3, first_block_weight, cfg)
    assert (name1, name2) == ("layers.1.attention.wkv_a.weight", "layers.2.attention.wkv_a.weight")
    assert w1.shape == w2.shape and not torch.allclose(w1, w2)
