"""The training loop: build everything from a JobConfig, then step, log and checkpoint.

Order of construction (see DESIGN.md): process group -> ParallelDims + meshes -> model on meta
-> parallelize plan (float8, EP, AC, compile, FSDP) -> materialise + init -> optimizer/LR ->
data for this data-parallel rank -> resume.

Loss normalisation: every rank divides its summed token losses by the number of tokens in the
whole optimizer step (all data-parallel ranks, all micro-batches), and gradients are summed
across ranks. That is the single-process gradient whatever the layout.
"""

import logging
import math
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.data.loader import build_dataloader
from torchmoe.data.tokenizer import build_tokenizer
from torchmoe.models.moe.balance import set_aux_loss_scale, update_expert_bias
from torchmoe.models.moe.experts import use_grouped_mm
from torchmoe.models.registry import get_model_spec
from torchmoe.parallel.dims import ParallelDims
from torchmoe.parallel.grad_norm import clip_grad_norm_
from torchmoe.parallel.plans import load_plan, resolve_dtype
from torchmoe.train.checkpoint import CheckpointManager, TrainState
from torchmoe.train.loss import build_loss_fn
from torchmoe.train.memory import check_model_fits
from torchmoe.train.freeze import ExpertFreezer, freeze_routers
from torchmoe.train.metrics import MetricsLogger, moe_layers, moe_step_stats
from torchmoe.train.optim import build_lr_scheduler, build_optimizer

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stops rather than continue on garbage."""


def default_device() -> torch.device:
    """This rank's GPU (``LOCAL_RANK`` under torchrun), or the CPU without CUDA."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device) -> int:
    """Join the process group torchrun describes (if any); returns the world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_world_size() if dist.is_initialized() else 1


class Trainer:
    def __init__(self, cfg: JobConfig, device: torch.device | None = None):
        self.cfg = cfg
        t = cfg.training
        self.device = device or default_device()
        if self.device.type == "cuda":
            if self.device.index is None:  # some libraries (torchao) want an explicit index
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)
        self.dims = ParallelDims.from_config(cfg.parallelism, init_distributed(self.device))
        self.dims.check_model(cfg)
        self.dims.build_meshes(self.device.type)
        self.dtype = resolve_dtype(t.mixed_precision_param, self.device.type)
        # One rank: autocast. Several: FSDP's mixed-precision policy casts the parameters.
        self.autocast = self.dtype != torch.float32 and self.dims.dp == 1
        torch.manual_seed(t.seed)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
            torch.use_deterministic_algorithms(True)

        self.tokenizer = build_tokenizer(cfg.model.tokenizer_path)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(f"model.vocab_size = {cfg.model.vocab_size} is smaller than the "
                              f"tokenizer's {self.tokenizer.vocab_size} tokens; raise it")

        spec = get_model_spec(cfg.model.name)
        with torch.device("meta"):
            model = spec.build(cfg)
        if cfg.moe.freeze_router:
            freeze_routers(model)
        check_model_fits(model, self.device, shards=self.dims.dp)
        plan = load_plan(cfg.parallelism.plan) if cfg.parallelism.plan else spec.parallelize
        model = plan(model, self.dims, cfg)
        model.to_empty(device=self.device)
        model.init_weights(cfg.model.init_std, cfg.model.n_layers, buffer_device=self.device)
        self.model = model
        self.moe_layers = [m for _, m in moe_layers(model)]
        self._log_model()

        self.optimizer = build_optimizer(model, cfg.optimizer, self.device)
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, t.steps)
        self.dataloader = build_dataloader(cfg.data, self.tokenizer, t.seq_len,
                                           t.local_batch_size, dp_rank=self.dims.dp_rank(),
                                           dp_world=self.dims.dp, seed=t.seed)
        self.batches = iter(self.dataloader)  # the loader itself: a resume moves it in place
        self.accum_steps = self._accumulation_steps()
        self.global_tokens = t.local_batch_size * t.seq_len * self.dims.dp * self.accum_steps
        self.state = TrainState()
        self.checkpoint = CheckpointManager(
            cfg.checkpoint, Path(cfg.job.dump_folder) / cfg.checkpoint.folder, model,
            self.optimizer, self.lr_scheduler, self.dataloader, self.state, self.dims.dp_rank())
        self.metrics = MetricsLogger(cfg, model, self.device, self.dtype)
        self.loss_fn = build_loss_fn(cfg.compile.enable and self.dims.tp == 1)
        self.mtp = cfg.model.mtp_num_layers > 0
        self.freezer: ExpertFreezer | None = None  # set in train(), after a checkpoint loads

    def _accumulation_steps(self) -> int:
        """Micro-batches per step; validate() checked that they divide evenly."""
        t = self.cfg.training
        if t.global_batch_size == -1:
            return 1
        return t.global_batch_size // (t.local_batch_size * self.dims.dp)

    def _log_model(self) -> None:
        cfg = self.cfg
        n_params = sum(p.numel() for p in self.model.parameters())  # global sizes of DTensors
        experts = ("torch._grouped_mm" if use_grouped_mm(cfg.moe.grouped_mm, self.device)
                   else "per-expert loop")
        d = self.dims
        logger.info("model %s/%s: %.3fB parameters on %s, compute %s, expert GEMMs: %s; "
                    "%d ranks: dp_replicate %d dp_shard %d tp %d pp %d ep %d (edp %d)",
                    cfg.model.name, cfg.model.flavor, n_params / 1e9, self.device, self.dtype,
                    experts, d.world_size, d.dp_replicate, d.dp_shard, d.tp, d.pp, d.ep, d.edp)

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over ``accum_steps`` micro-batches; returns (loss, grad norm, lr
        used), the loss being the mean over every token of the step on every rank. Balance and
        MTP losses are in the gradient; their values reach the log through ``after_step``."""
        self.optimizer.zero_grad(set_to_none=True)
        # Balance losses are computed per token shard: one per micro-batch, dp and tp rank.
        set_aux_loss_scale(1.0 / (self.accum_steps * self.dims.dp * self.dims.tp))
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(self.accum_steps):
            inputs, labels = next(self.batches)
            inputs, labels = inputs.to(self.device), labels.to(self.device)
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                # Multi-token prediction needs the targets inside the model.
                logits = self.model(inputs, labels) if self.mtp else self.model(inputs)
            with loss_parallel() if self.dims.tp > 1 else nullcontext():
                loss = self.loss_fn(logits, labels)
                (loss / self.global_tokens).backward()
            if isinstance(loss, DTensor):  # vocabulary-parallel loss: the same on every tp rank
                loss = loss.full_tensor()
            loss_sum += loss.detach()
        if self.freezer is not None:
            self.freezer.zero_grads()
        grad_norm = clip_grad_norm_(list(self.model.parameters()), self.cfg.training.max_norm)
        loss_mean = (loss_sum / self.global_tokens).reshape(1)
        if self.dims.meshes:
            dist.all_reduce(loss_mean, group=self.dims.meshes.dp.get_group())
        # The step's one host sync: the values the non-finite check and the log need.
        loss_value, norm_value = torch.cat([loss_mean, grad_norm.reshape(1).to(loss_mean)]).tolist()
        for what, value in (("loss", loss_value), ("gradient norm", norm_value)):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{what} is {value} at step {self.state.step + 1}; stopping before the "
                    "update. Try a lower optimizer.lr, more lr_scheduler.warmup_steps or "
                    "training.max_norm > 0")
        lr = self.lr_scheduler.get_last_lr()[0]
        self.optimizer.step()
        if self.freezer is not None:
            self.freezer.restore()
        self.lr_scheduler.step()
        return loss_value, norm_value, lr

    def after_step(self) -> dict[str, torch.Tensor]:
        """Expert-bias update from this step's token counts, summed over every rank that
        routes other tokens, so all ranks apply the same bias; returns the step's MoE and MTP
        statistics (``moe_step_stats``, on the device: metrics read them at log time) and
        resets the buffers."""
        layers = self.moe_layers
        buffers = [m.tokens_per_expert for m in layers] + [m.stats for m in layers]
        buffers += [self.model.mtp_loss_sum] if self.mtp else []
        if not buffers:
            return {}
        group = self.dims.meshes.dp_tp.get_group() if self.dims.meshes else None
        shards = self.accum_steps * (dist.get_world_size(group) if group else 1)
        flat = torch.cat([b.flatten().float() for b in buffers])
        if group:
            dist.all_reduce(flat, group=group)  # one collective for every layer's buffers
        totals = [t.view_as(b) for t, b in zip(flat.split([b.numel() for b in buffers]),
                                                 buffers)]
        for b in buffers:
            b.zero_()
        out = {}
        if layers:
            L = len(layers)
            counts, stats = torch.stack(totals[:L]), torch.stack(totals[L:2 * L])
            rate = self.cfg.moe.bias_update_rate
            for m, layer_counts in zip(layers, counts):
                if m.router.expert_bias is not None and rate > 0:
                    update_expert_bias(m.router.expert_bias, layer_counts, rate)
            biases = [m.router.expert_bias for m in layers]
            bias_LE = torch.stack(biases) if all(b is not None for b in biases) else None
            out = moe_step_stats(counts, stats, shards, bias_LE)
        if self.mtp:
            out["mtp_loss"] = totals[-1] / shards
        return out

    def train(self) -> list[float]:
        """Run to ``training.steps``; returns the loss of every step run here."""
        cfg = self.cfg
        self.checkpoint.load()  # restores self.state.step, unless starting fresh or from a seed
        if cfg.checkpoint.create_seed_checkpoint:
            self.checkpoint.save_seed()
            return []
        if cfg.moe.freeze_experts:  # after loading: the frozen rows are the loaded ones
            self.freezer = ExpertFreezer(self.model, cfg.moe.freeze_experts)
        tokens_per_gpu = self.global_tokens // self.dims.world_size  # tp ranks share a batch
        losses = []
        while self.state.step < cfg.training.steps:
            loss, grad_norm, lr = self.train_step()
            self.state.step += 1
            losses.append(loss)
            self.metrics.record_step(tokens_per_gpu, loss, self.after_step())
            step = self.state.step
            if step % cfg.metrics.log_freq == 0 or step == cfg.training.steps:
                self.metrics.log(step, grad_norm, lr)
            self.checkpoint.maybe_save(step, cfg.training.steps)
        return losses
