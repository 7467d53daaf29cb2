"""End-to-end training: loss goes down, accumulation is exact, resume is bit-exact, NaN stops.

These run on the CPU in float32 even where a GPU exists: exactness is the point."""

import functools
import logging
import math

import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.train import trainer as trainer_module
from torchmoe.train.metrics import duration
from torchmoe.train.trainer import NonFiniteLossError

Trainer = functools.partial(trainer_module.Trainer, device=torch.device("cpu"))


def test_loss_decreases(tiny_config):
    cfg = tiny_config(**{"training.steps": 40, "optimizer.lr": 3e-3})
    losses = Trainer(cfg).train()
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


def test_gradient_accumulation_equals_one_big_batch(tiny_config):
    big = Trainer(tiny_config(**{"training.local_batch_size": 8, "training.steps": 3}))
    acc = Trainer(
        tiny_config(
            **{"training.local_batch_size": 4, "training.global_batch_size": 8, "training.steps": 3}
        )
    )
    assert acc.accum_steps == 2
    torch.testing.assert_close(big.train(), acc.train(), rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(big.model.named_parameters(), acc.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_resume_is_bit_exact(tiny_config):
    ckpt = {"checkpoint.enable": "true", "checkpoint.interval": 3, "training.steps": 6}
    full = Trainer(tiny_config(**ckpt)).train()
    again = {"checkpoint.load_step": 3, "checkpoint.discard_newer": "true"}
    resumed = Trainer(tiny_config(**ckpt, **again))
    tail = resumed.train()
    assert tail == full[3:]
    assert resumed.checkpoint.saved_steps() == [3, 6]
    assert (resumed.checkpoint.folder / "discarded" / "step-6").is_dir()  # the first run's
    assert not list(resumed.checkpoint.folder.glob("*.tmp"))


def test_checkpoints_with_positional_optimizer_groups_still_resume(tiny_config):
    """Checkpoints written before the optimizer's param_groups were keyed by parameter name."""
    ckpt = {"checkpoint.enable": "true", "checkpoint.interval": 3, "training.steps": 6}
    full = Trainer(tiny_config(**ckpt)).train()
    old = Trainer(tiny_config(**ckpt, **{"checkpoint.folder": "old"}))
    old.checkpoint.states["train"].flat = False  # as those checkpoints were written
    old.train()
    resumed = Trainer(
        tiny_config(
            **ckpt,
            **{
                "checkpoint.folder": "old",
                "checkpoint.load_step": 3,
                "checkpoint.discard_newer": "true",
            },
        )
    )
    assert resumed.train() == full[3:]


def test_keep_latest_k_and_missing_step(tiny_config):
    cfg = tiny_config(
        **{
            "checkpoint.enable": "true",
            "checkpoint.interval": 1,
            "checkpoint.keep_latest_k": 2,
            "training.steps": 4,
        }
    )
    trainer = Trainer(cfg)
    trainer.train()
    assert trainer.checkpoint.saved_steps() == [3, 4]
    with pytest.raises(ConfigError, match=r"checkpoint.load_step = 1: no checkpoint step-1"):
        Trainer(tiny_config(**{"checkpoint.enable": "true", "checkpoint.load_step": 1})).train()


def test_nonfinite_loss_stops_with_the_step(tiny_config):
    trainer = Trainer(tiny_config(**{"training.steps": 5}))
    trainer.train_step()
    trainer.state.step = 1
    trainer.model.output.register_forward_hook(lambda m, i, out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match="loss is nan at step 2"):
        trainer.train()


def test_nonfinite_gradient_stops_before_the_update(tiny_config):
    trainer = Trainer(tiny_config(**{"training.steps": 2}))
    weight = trainer.model.output.weight
    before = weight.detach().clone()
    weight.register_hook(lambda g: g * float("inf"))
    with pytest.raises(NonFiniteLossError, match=r"gradient norm is (nan|inf) at step 1"):
        trainer.train()
    assert torch.equal(weight.detach(), before)


def test_resuming_into_another_model_is_one_clear_error(tiny_config):
    Trainer(tiny_config(**{"checkpoint.enable": "true", "training.steps": 1})).train()
    with pytest.raises(ConfigError, match=r"saved by a different job \(model.dim 64 -> 96\)"):
        Trainer(
            tiny_config(**{"checkpoint.enable": "true", "training.steps": 2, "model.dim": 96})
        ).train()


def test_expert_bias_follows_the_steps_token_counts(tiny_config):
    trainer = Trainer(tiny_config(**{"moe.bias_update_rate": 0.01}))
    counts = trainer.train_step().moe["tokens"][0]
    assert counts.sum().item() == 4 * 32 * trainer.cfg.moe.router_topk
    expected = 0.01 * torch.sign(counts.mean() - counts)
    torch.testing.assert_close(trainer.moe_layers[0].router.expert_bias, expected)
    assert trainer.moe_layers[0].tokens_per_expert.sum().item() == 0  # reset for the next step


def test_model_too_large_is_refused_before_allocation(tiny_config):
    cfg = tiny_config(
        **{
            "model.flavor": "671B",
            "model.dim": 7168,
            "model.inter_dim": 18432,
            "moe.ffn_hidden_size": 2048,
            "moe.shared_expert_intermediate_size": 2048,
        }
    )
    with pytest.raises(ConfigError, match=r"need ~\d+ GiB for weights, gradients and AdamW"):
        Trainer(cfg)


def test_full_activation_checkpointing_changes_nothing_but_memory(tiny_config):
    plain = Trainer(tiny_config(**{"training.steps": 3}))
    ac = Trainer(tiny_config(**{"training.steps": 3, "activation_checkpoint.mode": "full"}))
    assert type(ac.model.layers["1"]).__name__ == "CheckpointWrapper"
    torch.testing.assert_close(plain.train(), ac.train(), rtol=1e-6, atol=1e-6)
    # recomputation must not count tokens twice: the expert bias moved identically
    for a, b in zip(plain.moe_layers, ac.moe_layers):
        torch.testing.assert_close(a.router.expert_bias, b.router.expert_bias)


def test_tensorboard_and_jsonl_get_the_log_rows(tiny_config, tmp_path):
    cfg = tiny_config(**{"metrics.enable_tensorboard": "true", "training.steps": 2})
    Trainer(cfg).train()
    run = tmp_path / "run"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    rows = (run / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 2 and '"dead_experts"' in rows[0]


def test_freezing_keys_keep_router_and_chosen_experts_fixed(tiny_config):
    trainer = Trainer(
        tiny_config(
            **{
                "training.steps": 3,
                "moe.freeze_experts": "0,3",
                "moe.freeze_router": "true",
                "optimizer.lr": 1e-2,
            }
        )
    )
    moe = trainer.moe_layers[0]
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    trainer.train()
    after = dict(moe.named_parameters())
    assert torch.equal(after["router.gate.weight"], before["router.gate.weight"])
    for name in ("experts.w13", "experts.w2"):
        assert torch.equal(after[name][[0, 3]], before[name][[0, 3]]), name
        assert not torch.equal(after[name][[1, 2]], before[name][[1, 2]]), name


def test_multi_token_prediction_loss_is_trained_and_logged(tiny_config):
    trainer = Trainer(tiny_config(**{"model.mtp_num_layers": 2, "model.mtp_loss_scale": 0.3}))
    mtp_params = [p for n, p in trainer.model.named_parameters() if n.startswith("mtp.")]
    stats = trainer.train_step().moe
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mtp_params)
    # 0.3 x the mean of two cross entropies of a near-uniform model over the vocabulary
    assert 0.3 * 0.8 * math.log(trainer.cfg.model.vocab_size) < stats["mtp_loss"].item()
    assert trainer.model.mtp.loss_sum.item() == 0  # reset for the next step
    assert "mtp_loss" not in Trainer(tiny_config()).train_step().moe


def test_logits_are_freed_before_backward_with_an_eager_loss(tiny_config):
    """The eager loss saves its own float32 tensors; the [B, S, V] logits must not stay
    referenced through backward (they are the step's largest activation)."""
    import weakref

    trainer = Trainer(tiny_config())
    alive_in_backward = []
    loss_fn = trainer.loss_fn

    def watched(logits, labels):
        ref = weakref.ref(logits)
        loss = loss_fn(logits, labels)
        loss.register_hook(lambda grad: alive_in_backward.append(ref() is not None) or grad)
        return loss

    trainer.loss_fn = watched
    trainer.train_step()
    assert alive_in_backward == [False]


def test_the_first_step_is_logged_and_the_run_ends_with_a_summary(tiny_config, caplog):
    quiet = {"metrics.log_freq": 10, "checkpoint.enable": "true", "checkpoint.interval": 4}
    with caplog.at_level(logging.INFO):
        losses = Trainer(tiny_config(**quiet)).train()
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert [line.split("|")[0].split()[1] for line in logged] == ["1/4", "4/4"]  # first, last
    first, last = logged
    assert first.startswith("step 1/4 (25%) | ") and last.startswith("step 4/4 (100%) | ")
    # the step's own loss; the window mean beside it, labelled, when the window has steps
    assert f"| loss {losses[0]:.4f} | " in first
    assert f"| loss {losses[3]:.4f} (mean of 3: {sum(losses[1:]) / 3:.4f}) | " in last
    for label in ("tok/s/rank ", "tflops/rank ", "mem (host peak rss) ", "| eta "):
        assert label in first
    best = min(range(4), key=losses.__getitem__)
    assert (
        "done: steps 1-4 in " in caplog.text
        and f"final loss {losses[-1]:.4f}, best {losses[best]:.4f} at step {best + 1}"
        in caplog.text
    )
    assert "checkpoints in " in caplog.text and "metrics.jsonl" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO):
        Trainer(tiny_config(**{**quiet, "training.steps": 6})).train()
    assert "step 5/6 (83%) |" in caplog.text and "done: steps 5-6 in " in caplog.text


def test_durations_read_as_a_person_says_them():
    assert [duration(s) for s in (4.25, 190, 3720)] == ["4.2s", "3m10s", "1h02m"]
