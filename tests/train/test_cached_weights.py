"""Cached bfloat16 weights (``training.compute_weights = "cached"``): training on them is
autocast's training bit for bit (with and without accumulation, with clipping), they cover what
autocast casts and nothing else, a master changed outside the optimizer (a resume) is copied
again, their bfloat16 gradients get a float32 norm, and what cannot run them is one config
line."""

import ast
import functools
import itertools
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.train.test_cli import run as run_cli
from torchmoe.config.errors import ConfigError
from torchmoe.kernels import grad_fold_ref
from torchmoe.parallel.grad_norm import grad_norm_and_clip_coef
from torchmoe.train import trainer as trainer_module
from torchmoe.train.cached_weights import CachedWeights, fold_bytes, wants_cached_weights

Trainer = functools.partial(trainer_module.Trainer, device=torch.device("cpu"))
# bfloat16 autocast on the CPU; torchmoe's AdamW for both modes; clipping active
BF16 = {
    "training.mixed_precision_param": "bfloat16",
    "optimizer.implementation": "torchmoe",
    "training.max_norm": 0.05,
    "optimizer.lr": 1e-2,
    "training.steps": 3,
}


def _train(
    tiny_config, mode: str, **overrides
) -> tuple[trainer_module.Trainer, list[tuple[float, float]]]:
    trainer = Trainer(tiny_config(**{**BF16, "training.compute_weights": mode, **overrides}))
    return trainer, _steps(trainer)


def _steps(trainer: trainer_module.Trainer) -> list[tuple[float, float]]:
    """(loss, gradient norm) of 3 steps."""
    return [(r.loss, r.grad_norm) for r in (trainer.train_step() for _ in range(3))]


@pytest.mark.parametrize("per_fold", [2, 4])
@pytest.mark.parametrize("accumulation", [1, 2, 3, 4])
def test_cached_weights_train_as_autocast_bit_for_bit(tiny_config, accumulation, per_fold):
    batch = {"training.global_batch_size": 4 * accumulation, "training.grads_per_fold": per_fold}
    cast, cast_steps = _train(tiny_config, "cast", **batch)
    cached, cached_steps = _train(tiny_config, "cached", **batch)
    assert cast.cached_weights is None and len(cached.cached_weights) > 0
    assert cached_steps == cast_steps
    for (name, a), b in zip(cast.model.named_parameters(), cached.model.parameters()):
        assert b.dtype == torch.float32 and torch.equal(a, b), name
    for c in cached.cached_weights.copies.values():  # the optimizer wrote the copies
        assert torch.equal(c.copy, c.master.bfloat16())


def _reference_as_kernel(monkeypatch) -> None:
    """Folds on the CPU take the path of the Triton kernel (squares in the last fold), run by
    the reference: a stand-in that is not ``grad_fold_ref`` itself."""
    import torchmoe.train.cached_weights as cached_module

    class StandIn:
        fold = staticmethod(grad_fold_ref.fold)

    monkeypatch.setattr(cached_module, "fold_implementation", lambda *_: StandIn)


@pytest.mark.parametrize("per_fold", [2, 4])
def test_the_last_folds_squares_make_the_norm(tiny_config, monkeypatch, per_fold):
    """Where the Triton fold runs, the step's last fold sums the squares and the norm takes
    them instead of a pass over those sums. Here the reference fold stands in for the kernel:
    every copy's gradient reaches the norm once, as a sum of squares or as a gradient, and the
    norm is the float64 norm of the step's gradients."""
    _reference_as_kernel(monkeypatch)
    seen = []

    def spy(grads, max_norm, pp_group=None, device=None, squares=()):
        seen.append((len(grads), len(squares)))
        return grad_norm_and_clip_coef(grads, max_norm, pp_group, device, squares)

    monkeypatch.setattr(trainer_module, "grad_norm_and_clip_coef", spy)
    trainer = Trainer(
        tiny_config(
            **BF16, **{"training.global_batch_size": 16, "training.grads_per_fold": per_fold}
        )
    )
    result = trainer.train_step()
    params = list(trainer.model.parameters())
    grads = trainer.cached_weights.grads(params)
    [(rest, squares)] = seen
    assert squares == len(trainer.cached_weights) and rest + squares == len(grads)
    want = torch.cat([g.double().flatten() for g in grads]).norm()
    torch.testing.assert_close(torch.tensor(result.grad_norm).double(), want, rtol=1e-6, atol=0)


def test_fold_bytes_count_the_sums_and_the_waiting_gradients():
    assert fold_bytes(1, 2) == 0  # no accumulation: copies and bf16 gradients cost nothing
    assert fold_bytes(4, 1) == 4  # the float32 sums only
    assert fold_bytes(4, 2) == 6  # and one gradient waiting for its pair
    assert fold_bytes(4, 4) == 10  # three waiting for the fold of four
    assert fold_bytes(2, 8) == 6  # never more waiting than the step's micro-batches


def test_the_config_allows_as_many_gradients_per_fold_as_the_kernel_takes():
    from dataclasses import fields

    from torchmoe.config.schema import Training
    from torchmoe.kernels.grad_fold_ref import MAX_GRADS

    [key] = [f for f in fields(Training) if f.name == "grads_per_fold"]
    assert key.metadata["le"] == MAX_GRADS


def test_copies_cover_the_weights_autocast_casts(tiny_config):
    trainer = Trainer(tiny_config(**BF16, **{"training.compute_weights": "cached"}))
    names = {p: n for n, p in trainer.model.named_parameters()}
    copied = {names[p] for p in trainer.cached_weights.copies}
    assert any(n.endswith("experts.w13") for n in copied)
    assert any(n.endswith("experts.w2") for n in copied)
    assert "output.weight" in copied
    assert any("attention" in n for n in copied)
    for n in copied:
        assert "router" not in n and "norm" not in n and "embeddings" not in n, n


def test_a_weight_shared_with_an_uncast_module_gets_no_copy():
    tied = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=False))
    tied[1].weight = tied[0].weight
    assert len(CachedWeights(tied, torch.bfloat16)) == 0
    plain = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10, bias=True))
    assert len(CachedWeights(plain, torch.bfloat16)) == 2  # the linear's weight and bias


def test_modules_that_turn_autocast_off_keep_their_weights():
    class Float32Gate(nn.Module):
        autocast_exempt = True

        def __init__(self):
            super().__init__()
            self.gate = nn.Linear(8, 1)

    model = nn.Sequential(nn.Linear(8, 8), Float32Gate())
    copied = CachedWeights(model, torch.bfloat16).copies
    assert set(copied) == {model[0].weight, model[0].bias}


def test_every_module_that_turns_autocast_off_is_marked():
    """A model module computing with autocast off must say so (``autocast_exempt``), else its
    linears would get bfloat16 copies."""
    root = Path(__file__).resolve().parents[2] / "torchmoe" / "models"
    found = 0
    for path in root.rglob("*.py"):
        for cls in ast.walk(ast.parse(path.read_text())):
            if not isinstance(cls, ast.ClassDef):
                continue
            off = [
                node
                for node in ast.walk(cls)
                if isinstance(node, ast.Call)
                and ast.unparse(node.func).endswith("autocast")
                and any(
                    k.arg == "enabled" and ast.unparse(k.value) == "False" for k in node.keywords
                )
            ]
            marked = any(
                isinstance(node, ast.Assign)
                and any(ast.unparse(t) == "autocast_exempt" for t in node.targets)
                and ast.unparse(node.value) == "True"
                for node in cls.body
            )
            assert marked or not off, f"{path.name}: {cls.name} turns autocast off unmarked"
            found += bool(off)
    assert found >= 1  # the router


def test_a_replaced_master_is_refused_not_put_back():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    cached = CachedWeights(model, torch.bfloat16)
    model[1].load_state_dict(nn.Linear(8, 8).state_dict(), assign=True)
    with pytest.raises(RuntimeError, match=r"Linear\.weight was replaced"):
        with cached.swapped():
            pass
    assert model[0].weight.dtype == torch.float32  # nothing was swapped in


def test_a_master_changed_outside_the_optimizer_is_copied_before_use():
    model = nn.Sequential(nn.Linear(8, 8))
    cached = CachedWeights(model, torch.bfloat16)
    with torch.no_grad():
        model[0].weight.add_(torch.randn(8, 8))  # as a checkpoint load writes it
    master = model[0].weight
    with cached.swapped():
        inside = model[0].weight
        assert inside.dtype == torch.bfloat16
        assert torch.equal(inside, master.bfloat16())
    assert model[0].weight is master


def test_a_resume_continues_exactly(tiny_config):
    ckpt = {**BF16, "training.compute_weights": "cached", "checkpoint.enable": "true"}
    ckpt |= {"checkpoint.interval": 2, "training.steps": 4}
    first = Trainer(tiny_config(**ckpt))
    losses = first.train()
    folder = first.checkpoint.folder
    for p in (folder / "step-4").iterdir():
        p.unlink()
    (folder / "step-4").rmdir()
    resumed = Trainer(tiny_config(**ckpt))
    assert resumed.train() == losses[2:]


def test_bfloat16_gradients_get_a_float32_norm():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(n, generator=g).bfloat16() * 3 for n in (1000, 4097, 7)]
    grads.insert(1, torch.randn(300, generator=g))  # float32 ones too (embeddings, norms)
    want = torch.cat([t.double() for t in grads]).norm()
    norm, coef = grad_norm_and_clip_coef(grads, max_norm=1.0)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm.double(), want, rtol=1e-6, atol=0)
    torch.testing.assert_close(coef.double(), 1.0 / want, rtol=1e-5, atol=0)


@pytest.mark.parametrize(
    "overrides, names",
    [
        ({"optimizer.implementation": "fused"}, "optimizer.implementation = 'fused'"),
        ({"quantize.float8_linear": "true"}, "float8"),
        ({"moe.freeze_experts": "0"}, "moe.freeze_experts"),
        ({"training.mixed_precision_param": "float32"}, "mixed_precision_param = 'float32'"),
    ],
)
def test_what_cannot_run_cached_weights_is_refused(tiny_config, overrides, names):
    with pytest.raises(ConfigError, match=r"training\.compute_weights = 'cached'") as err:
        tiny_config(**{"training.compute_weights": "cached", **overrides})
    assert names in str(err.value) and "\n" not in str(err.value)


def test_cached_needs_one_process_under_autocast(tiny_config):
    cfg = tiny_config(**BF16, **{"training.compute_weights": "cached"})
    cpu = torch.device("cpu")
    assert wants_cached_weights(cfg, autocast=True, world_size=1, device=cpu)
    with pytest.raises(ConfigError, match=r"does not work with 2 processes"):
        wants_cached_weights(cfg, autocast=False, world_size=2, device=cpu)
    with pytest.raises(ConfigError, match="this run computes in float32"):
        wants_cached_weights(cfg, autocast=False, world_size=1, device=cpu)


def test_the_dry_run_refuses_cached_weights_on_several_ranks(tiny_config, monkeypatch):
    from torchmoe.parallel.dry_run import dry_run

    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = tiny_config(**BF16, **{"training.compute_weights": "cached"})
    with pytest.raises(ConfigError, match=r"does not work with 2 processes"):
        dry_run(cfg)


def test_auto_picks_cached_only_where_it_applies(tiny_config):
    cfg = tiny_config(**{"training.compute_weights": "auto"})
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert wants_cached_weights(cfg, autocast=True, world_size=1, device=cuda)
    assert not wants_cached_weights(cfg, autocast=True, world_size=2, device=cuda)
    assert not wants_cached_weights(cfg, autocast=False, world_size=1, device=cuda)
    assert not wants_cached_weights(cfg, autocast=True, world_size=1, device=cpu)  # foreach
    cfg.optimizer.implementation = "torchmoe"
    assert wants_cached_weights(cfg, autocast=True, world_size=1, device=cpu)
    cfg.quantize.float8_experts = True  # torchao's op wraps the float32 expert weights
    assert not wants_cached_weights(cfg, autocast=True, world_size=1, device=cuda)
    cfg.quantize.float8_experts_weight_grad = "bfloat16"  # torchmoe's takes the bf16 copies
    assert wants_cached_weights(cfg, autocast=True, world_size=1, device=cuda)
    cfg.quantize.float8_experts_weight_grad = "float8"
    cfg.quantize.float8_experts, cfg.moe.freeze_experts = False, [1]
    assert not wants_cached_weights(cfg, autocast=True, world_size=1, device=cuda)
    cfg.moe.freeze_experts, cfg.training.compute_weights = [], "cast"
    assert not wants_cached_weights(cfg, autocast=True, world_size=1, device=cuda)


def test_the_refusal_is_one_line_and_exit_2_from_the_command_line(tmp_path, data_cache):
    args = ["--training.compute_weights", "cached", "--optimizer.implementation", "foreach"]
    proc = run_cli([sys.executable, "-m", "torchmoe.train", *args], Path(tmp_path), data_cache)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "training.compute_weights = 'cached' does not work with" in proc.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_cached_weights_on_a_gpu_follow_autocast(tiny_config, compiled):
    """The Triton update writing the copies, compiled blocks swapping them, accumulation with
    all micro-batches in one fold: the same training as autocast's casts (deterministic
    kernels; the norm's sums round differently, so close rather than equal). Without clipping
    the weights agree; with it the clip factor's last bits differ, which Adam turns into steps
    of size lr on near-zero gradients, so only losses and norms are compared."""
    for max_norm in (0.0, 0.05):
        job = {
            "training.deterministic": "true",
            "training.global_batch_size": 8,
            "training.grads_per_fold": 2,
            "compile.enable": str(compiled).lower(),
            "training.max_norm": max_norm,
            "optimizer.lr": 1e-2,
        }
        runs = {}
        for mode in ("cast", "cached"):
            cfg = tiny_config(**job, **{"training.compute_weights": mode})
            trainer = trainer_module.Trainer(cfg)
            runs[mode] = (trainer, _steps(trainer))
        (cast, cast_steps), (cached, cached_steps) = runs["cast"], runs["cached"]
        assert cast.cached_weights is None and len(cached.cached_weights) > 0
        torch.testing.assert_close(cached_steps, cast_steps, rtol=1e-4, atol=0)
        for c in cached.cached_weights.copies.values():
            assert torch.equal(c.copy, c.master.bfloat16())
        if max_norm == 0:
            for a, b in zip(cast.model.parameters(), cached.model.parameters()):
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("per_fold", [1, 2, 3, 4])
@pytest.mark.parametrize("accumulation", [2, 3, 4, 5])
def test_folds_sum_any_pattern_of_missing_gradients(monkeypatch, accumulation, per_fold):
    """A weight may get no gradient in some micro-batches (an expert no token reached): every
    pattern, folded ``per_fold`` at a time, gives the float32 sum of one-at-a-time folds, bit
    for bit, and its sum of squares where the step's last micro-batch folded it."""
    from torchmoe.train.cached_weights import WeightCopy

    _reference_as_kernel(monkeypatch)
    g = torch.Generator().manual_seed(accumulation)
    for pattern in itertools.product([False, True], repeat=accumulation):
        c = WeightCopy(nn.Parameter(torch.randn(64)), nn.Parameter(torch.empty(64).bfloat16()), [])
        want = None
        for i, has_grad in enumerate(pattern):
            grad = (torch.randn(64, generator=g) * 10.0 ** (i - 2)).bfloat16() if has_grad else None
            c.copy.grad = grad
            if grad is not None:
                want, _ = grad_fold_ref.fold(want, [grad])
            c.fold(last=i == accumulation - 1, per_fold=per_fold)
            assert len(c.waiting) < per_fold, pattern
        assert c.waiting == [] and c.copy.grad is None, pattern
        if want is None:
            assert c.grad is None and c.square_sum is None, pattern
            continue
        assert c.grad.dtype == torch.float32 and torch.equal(c.grad, want), pattern
        folded_last = pattern[-1] or sum(pattern) % per_fold != 0
        if folded_last:
            exact = want.double().square().sum()
            torch.testing.assert_close(c.square_sum.double(), exact, rtol=1e-6, atol=0)
        else:  # the sum was finished before the last micro-batch: the norm takes it itself
            assert c.square_sum is None, pattern
