"""The training loop: build everything from a JobConfig, then step, log and checkpoint.

Order of construction (see DESIGN.md): model on meta -> float8 -> activation checkpointing ->
compile -> materialise + init -> optimizer/LR -> data -> resume.
"""

import logging
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.data.loader import build_dataloader
from torchmoe.data.tokenizer import build_tokenizer
from torchmoe.models.moe.balance import set_aux_loss_scale, update_expert_bias
from torchmoe.models.moe.experts import use_grouped_mm
from torchmoe.models.registry import get_model_spec
from torchmoe.parallel.activation_checkpoint import apply_ac
from torchmoe.parallel.compile import apply_compile
from torchmoe.quant.float8 import apply_float8_linears
from torchmoe.train.checkpoint import CheckpointManager, TrainState
from torchmoe.train.memory import check_model_fits
from torchmoe.train.metrics import MetricsLogger, moe_layers
from torchmoe.train.optim import build_lr_scheduler, build_optimizer

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stops rather than continue on garbage."""


def default_device() -> torch.device:
    """This rank's GPU (``LOCAL_RANK`` under torchrun), or the CPU without CUDA."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def compute_dtype(cfg: JobConfig, device: torch.device) -> torch.dtype:
    choice = cfg.training.mixed_precision_param
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if choice == "bfloat16" else torch.float32


class Trainer:
    def __init__(self, cfg: JobConfig, device: torch.device | None = None):
        self.cfg = cfg
        t = cfg.training
        self.device = device or default_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.dtype = compute_dtype(cfg, self.device)
        torch.manual_seed(t.seed)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
            torch.use_deterministic_algorithms(True)

        self.tokenizer = build_tokenizer(cfg.model.tokenizer_path)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the "
                              f"tokenizer's {self.tokenizer.vocab_size} tokens; raise it")

        with torch.device("meta"):
            model = get_model_spec(cfg.model.name).build(cfg)
        check_model_fits(model, self.device)
        apply_float8_linears(model, cfg.quantize)
        apply_ac(model, cfg.activation_checkpoint)
        apply_compile(model, cfg.compile)
        model.to_empty(device=self.device)
        model.init_weights(cfg.model.init_std, cfg.model.n_layers, buffer_device=self.device)
        self.model = model
        self.moe_layers = [m for _, m in moe_layers(model)]
        n_params = sum(p.numel() for p in model.parameters())
        experts = ("torch._grouped_mm" if use_grouped_mm(cfg.moe.grouped_mm, self.device)
                   else "per-expert loop")
        logger.info("model %s/%s: %.3fB parameters on %s, compute %s, expert GEMMs: %s",
                    cfg.model.name, cfg.model.flavor, n_params / 1e9, self.device, self.dtype,
                    experts)

        self.optimizer = build_optimizer(model, cfg.optimizer, self.device)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, t.steps)
        self.dataloader = build_dataloader(cfg.data, self.tokenizer, t.seq_len,
                                           t.local_batch_size, dp_rank=0, dp_world=1,
                                           seed=t.seed)
        self.batches = iter(self.dataloader)
        self.accum_steps = 1 if t.global_batch_size == -1 else (
            t.global_batch_size // t.local_batch_size)
        self.state = TrainState()
        self.checkpoint = CheckpointManager(
            cfg.checkpoint, Path(cfg.job.dump_folder) / cfg.checkpoint.folder, model,
            self.optimizer, self.lr_scheduler, self.dataloader, self.state)
        self.metrics = MetricsLogger(cfg, model, self.device, self.dtype)

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over ``accum_steps`` micro-batches; returns (loss, aux, grad
        norm). The LM loss of each micro-batch is its mean over tokens, divided by the number of
        micro-batches; balance losses get the same factor."""
        self.optimizer.zero_grad(set_to_none=True)
        set_aux_loss_scale(1.0 / self.accum_steps)
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.accum_steps):
            inputs, labels = next(self.batches)
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            with torch.autocast(self.device.type, dtype=self.dtype,
                                enabled=self.dtype != torch.float32):
                logits = self.model(inputs)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
            (loss / self.accum_steps).backward()
            loss_sum += loss.detach()
        max_norm = self.cfg.training.max_norm
        params = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else math.inf,
                                                   foreach=True)
        loss_value = loss_sum.item() / self.accum_steps
        if not math.isfinite(loss_value):
            raise NonFiniteLossError(
                f"loss is {loss_value} at step {self.state.step + 1}; stopping. Try a lower "
                "optimizer.lr, more lr_scheduler.warmup_steps or training.max_norm > 0")
        self.optimizer.step()
        self.lr_scheduler.step()
        aux = 0.0
        if self.moe_layers:
            aux = torch.stack([m.aux_loss_sum for m in self.moe_layers]).sum().item()
        aux /= self.accum_steps
        return loss_value, aux, grad_norm.item()

    def after_step(self) -> torch.Tensor:
        """Expert-bias update from this step's token counts; returns the counts [layers, E]
        and resets the per-step buffers."""
        if not self.moe_layers:
            return torch.zeros(0, 0)
        rate = self.cfg.moe.bias_update_rate
        counts = torch.stack([m.tokens_per_expert for m in self.moe_layers]).cpu()
        for m in self.moe_layers:
            if m.router.expert_bias is not None and rate > 0:
                update_expert_bias(m.router.expert_bias, m.tokens_per_expert, rate)
            m.tokens_per_expert.zero_()
            m.aux_loss_sum.zero_()
        return counts

    def train(self) -> list[float]:
        """Run to ``training.steps``; returns the loss of every step run here."""
        cfg = self.cfg
        resumed = self.checkpoint.load()
        if resumed is not None:
            self.state.step = resumed
        self.batches = iter(self.dataloader)  # after load: the loader may have moved on
        tokens_per_step = cfg.training.local_batch_size * cfg.training.seq_len * self.accum_steps
        losses = []
        while self.state.step < cfg.training.steps:
            loss, aux, grad_norm = self.train_step()
            self.state.step += 1
            losses.append(loss)
            self.metrics.record_step(tokens_per_step, loss, aux, self.after_step())
            step = self.state.step
            if step % cfg.metrics.log_freq == 0 or step == cfg.training.steps:
                self.metrics.log(step, grad_norm, self.lr_scheduler.get_last_lr()[0])
            self.checkpoint.maybe_save(step, cfg.training.steps)
        return losses
