"""Prompt/completion (and chat) data: the loss is the mean over the labelled tokens of the whole
step, equal to a float64 reference, and the same on one process with accumulation as on two
data-parallel ranks (the normaliser counts labels over every rank)."""

import json
import random

import torch
import torch.nn.functional as F

from tests.distributed.launcher import run_ranks
from torchmoe.config.registry import build_model
from torchmoe.data.loader import IGNORE
from torchmoe.data.prefetch import Batch
from torchmoe.data.stdlib_docs import load_stdlib_docs
from torchmoe.train.trainer import Trainer


def write_pairs(path, rng: random.Random, n: int) -> None:
    words = ["why", "route", "tokens", "experts", "because", "load", "balance"]
    say = lambda k: " ".join(rng.choices(words, k=rng.randint(1, k)))  # noqa: E731
    rows = [{"prompt": say(6), "completion": " " + say(10)} for _ in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def masked_run(tiny_config, tmp_path, rng, **extra):
    """A trainer on prompt/completion pairs, its first batch, and a float64 copy of its model."""
    write_pairs(tmp_path / "pairs.jsonl", rng, 50)
    keys = {
        "data.dataset": str(tmp_path / "pairs.jsonl"),
        "data.format": "prompt_completion",
        "data.prefetch_batches": "0",
        **extra,
    }
    trainer = Trainer(tiny_config(**keys), device=torch.device("cpu"))
    inputs, labels, _ = next(trainer.dataloader)
    assert (labels == IGNORE).any() and (labels != IGNORE).any()
    reference = build_model(trainer.cfg).double()
    reference.load_state_dict({k: v.double() for k, v in trainer.model.state_dict().items()})
    return trainer, reference, inputs, labels


def test_masked_loss_equals_a_float64_reference(tiny_config, tmp_path, rng):
    trainer, reference, inputs, labels = masked_run(
        tiny_config, tmp_path, rng, **{"training.max_norm": "0"}
    )
    with torch.no_grad():
        logits = reference(inputs)
    nll = F.cross_entropy(
        logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum"
    )
    expected = (nll / (labels != IGNORE).sum()).item()
    trainer.batches = iter([Batch(inputs, labels)])
    assert abs(trainer.train_step().loss - expected) < 1e-5 * expected


def train(rank: int, cfg) -> list[float]:
    return Trainer(cfg, device=torch.device("cpu")).train()


def test_one_process_equals_two_data_parallel_ranks(tiny_config, tmp_path, data_cache, rng):
    load_stdlib_docs(data_cache)
    write_pairs(tmp_path / "pairs.jsonl", rng, 80)
    keys = {
        "data.dataset": str(tmp_path / "pairs.jsonl"),
        "data.format": "prompt_completion",
        "training.global_batch_size": "4",
        "training.steps": "3",
    }
    [one] = run_ranks(1, train, tiny_config(**keys, **{"training.local_batch_size": "2"}))
    two = run_ranks(2, train, tiny_config(**keys, **{"training.local_batch_size": "2"}))
    torch.testing.assert_close(two[0], one, rtol=1e-5, atol=1e-5)


def mtp_loss_reference(model, inputs, labels, scale: float) -> float:
    """Multi-token prediction by hand: depth k reads the true token t + k (the next input where
    a label is masked) and predicts labels[t + k], skipping masked and past-the-end targets."""
    true_next = torch.cat([inputs[:, 1:], labels[:, -1:].clamp(min=0)], dim=1)
    h = model.run_layers(model.tok_embeddings(inputs))
    losses = []
    for k, depth in enumerate(model.mtp, start=1):
        shifted = F.pad(true_next[:, k - 1 :], (0, k - 1), value=0)
        h = depth(h, model.tok_embeddings(shifted), model.rope_cos_sin)
        logits = model.output(depth.norm(h))
        targets = F.pad(labels[:, k:], (0, k), value=IGNORE)
        losses.append(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE))
    return (scale / len(losses) * torch.stack(losses).sum()).item()


def test_multi_token_prediction_with_masked_labels_equals_a_float64_reference(
    tiny_config, tmp_path, rng
):
    trainer, reference, inputs, labels = masked_run(
        tiny_config, tmp_path, rng, **{"model.mtp_num_layers": "2", "model.mtp_loss_scale": "0.5"}
    )
    with torch.no_grad():
        expected = mtp_loss_reference(reference, inputs, labels, 0.5)
    trainer.batches = iter([Batch(inputs, labels)])
    got = trainer.train_step().moe["mtp_loss"].item()
    assert abs(got - expected) < 1e-5 * expected


def test_a_depth_with_every_target_masked_adds_zero_not_nan(tiny_config):
    """A micro-batch that is all prompt (a prompt longer than the sequence) has nothing for
    multi-token prediction to learn: its loss is 0, so the logged value stays finite."""
    model = build_model(tiny_config(**{"model.mtp_num_layers": "2"}))
    model.init_weights(0.02, 3)
    tokens = torch.randint(0, 4000, (2, 32))
    labels = torch.full((2, 32), IGNORE)  # every label masked
    h = model.run_layers(model.tok_embeddings(tokens))
    mtp = model.mtp_inputs(tokens, labels)
    assert model.mtp.loss(h, mtp, labels, model.rope_cos_sin, model.output) == 0
    labels[0, 10] = tokens[0, 11]  # one counted target (depth 1 at position 9): positive
    assert model.mtp.loss(h, mtp, labels, model.rope_cos_sin, model.output) > 0
