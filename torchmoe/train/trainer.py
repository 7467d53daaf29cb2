"""The training loop: build everything from a JobConfig, then step, log and checkpoint.

Order of construction (see docs/ARCHITECTURE.md): process group -> ParallelDims + meshes -> model on
meta -> parallelize plan (float8, EP, AC, compile, FSDP) -> materialise + init -> optimizer/LR ->
data for this data-parallel rank -> resume.

Loss normalisation: every rank divides its summed token losses by the number of tokens in the
whole optimizer step (all data-parallel ranks, all micro-batches), and gradients are summed
across ranks. That is the single-process gradient whatever the layout.
"""

import logging
import math
import os
import signal
import time
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

from torchmoe.config.errors import ConfigError, first_line
from torchmoe.config.parallel_checks import check_parallel_shapes
from torchmoe.config.pipeline_keys import microbatches as microbatches_of
from torchmoe.config.registry import build_model, get_model_spec
from torchmoe.config.schema import JobConfig
from torchmoe.data.loader import (
    IGNORE,
    build_loader,
    open_training_and_validation,
    row_counts,
)
from torchmoe.data.prefetch import Batch
from torchmoe.data.tokenizer import build_tokenizer
from torchmoe.models.flops import flops_per_token
from torchmoe.models.moe.balance import set_aux_loss_scale
from torchmoe.models.moe.experts import use_grouped_mm
from torchmoe.parallel.activation_checkpoint import check_recompute_modules
from torchmoe.parallel.context_parallel import (
    local_positions,
    missing_context_parallel,
    shard_sequence,
)
from torchmoe.parallel.dims import ParallelDims
from torchmoe.parallel.grad_norm import clip_grad_norm_, grad_norm_and_clip_coef
from torchmoe.parallel.named_init import init_by_name
from torchmoe.parallel.pipeline import Pipeline, build_pipeline
from torchmoe.parallel.plans import load_plan, resolve_dtype
from torchmoe.train.cached_weights import CachedWeights, fold_bytes, wants_cached_weights
from torchmoe.train.checkpoint import CheckpointManager, TrainState
from torchmoe.train.expert_bias import ExpertBiasUpdate
from torchmoe.train.fingerprint import job_fingerprint
from torchmoe.train.folder_lock import folder_lock
from torchmoe.train.freeze import ExpertFreezer, freeze_routers
from torchmoe.train.loss import build_loss_fn
from torchmoe.train.memory import check_model_fits
from torchmoe.train.metrics import MetricsLogger, duration
from torchmoe.train.moe_stats import MoEStepStats, step_values
from torchmoe.train.optim import build_lr_scheduler, build_optimizer
from torchmoe.train.preemption import StopRequest, stop_signals
from torchmoe.train.profiling import StepProfiler
from torchmoe.train.ranks import is_lead
from torchmoe.train.validation import Validator
from torchmoe.train.watchdog import Watchdog, process_group_timeout

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; training stops rather than continue on garbage."""


class StepOutOfMemoryError(RuntimeError):
    """A step ran out of device memory; the message says which step and what to change."""


def _full(loss: torch.Tensor) -> torch.Tensor:
    """A vocabulary-parallel loss (DTensor) is the same on every tp rank: its value."""
    return loss.full_tensor() if isinstance(loss, DTensor) else loss


@dataclass
class StepResult:
    """One optimizer step: the loss (mean over every token of the step on every rank), the
    gradient norm, the learning rate used, and the MoE / MTP statistics (``step_values``, on
    the device: the log reads them when it writes a line)."""

    loss: float
    grad_norm: float
    lr: float
    moe: dict[str, torch.Tensor]


def default_device() -> torch.device:
    """This rank's GPU (``LOCAL_RANK`` under torchrun), or the CPU without CUDA."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def init_distributed(device: torch.device, timeout: timedelta) -> int:
    """Join the process group torchrun describes (if any); returns the world size."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timeout)
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
        spec = get_model_spec(cfg.model.name)
        timeouts = (cfg.comm.init_timeout_s, cfg.comm.train_timeout_s)
        world = init_distributed(self.device, process_group_timeout(*timeouts))
        self.watchdog: Watchdog | None = None  # while training, with several ranks
        self.dims = ParallelDims.from_config(cfg.parallelism, world)
        check_parallel_shapes(cfg, spec.heads_keys)
        self.dims.build_meshes(self.device.type)
        self.dtype = resolve_dtype(t.mixed_precision_param, self.device.type)
        # FSDP's mixed-precision policy casts the parameters when FSDP is on, else autocast.
        self.autocast = self.dims.mixed_precision(self.dtype) == "autocast"
        torch.manual_seed(t.seed)
        if t.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it
            torch.use_deterministic_algorithms(True)

        self.tokenizer = build_tokenizer(cfg.model.tokenizer_path)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size = {cfg.model.vocab_size} is smaller than the "
                f"tokenizer's {self.tokenizer.vocab_size} tokens; raise it"
            )

        with torch.device("meta"):
            model = build_model(cfg)
        if cfg.moe.freeze_router:
            freeze_routers(model)
        check_recompute_modules(model, cfg.activation_checkpoint)
        cached = wants_cached_weights(cfg, self.autocast, self.dims.world_size, self.device)
        self.accum_steps = self._accumulation_steps()
        check_model_fits(
            model,
            self.device,
            shards=self.dims.dp * self.dims.cp * self.dims.pp,
            moment_bytes=2 if cfg.optimizer.state_dtype == "bfloat16" else 4,
            extra_bytes=fold_bytes(self.accum_steps, t.grads_per_fold) if cached else 0,
        )
        flops = flops_per_token(model, t.seq_len)
        self.n_params = sum(p.numel() for p in model.parameters())  # the whole model's
        job = job_fingerprint(cfg, model, self.tokenizer.digest)  # before any split
        self._log_model(model)
        whole = model  # before any split: the statistics lay out rows by its MoE layers
        plan = load_plan(cfg.parallelism.plan or spec.plan)
        # context parallelism: the positions of this rank's chunks of every sequence
        self.cp_positions: torch.Tensor | None = None
        if self.dims.cp > 1:
            rank = self.dims.meshes.dense["cp"].get_local_rank()
            self.cp_positions = local_positions(t.seq_len, self.dims.cp, rank, self.device)
        self.pipeline: Pipeline | None = None
        if self.dims.pp_enabled:
            self.pipeline = build_pipeline(
                model,
                self.dims,
                cfg,
                plan,
                self._materialize,
                self.device,
                lambda logits, labels: self.loss_fn(logits, labels) / self.global_tokens,
                # FSDP's mixed precision casts the hidden states; autocast keeps them float32
                hidden_dtype=self.dtype if self.dims.fsdp_enabled else torch.float32,
                logits_dtype=self.dtype,
                positions=self.cp_positions,
            )
            model = self.pipeline.model
        else:
            model = plan(model, self.dims, cfg)
            self._materialize(model)
        self.model = model
        if self.dims.cp > 1 and (left_out := missing_context_parallel(model)):
            raise ConfigError(
                f"parallelism.plan = {cfg.parallelism.plan!r} did not apply context parallelism "
                f"to {len(left_out)} attention modules ({left_out[0]}, ...) with "
                f"parallelism.cp = {self.dims.cp}: those would attend within their own chunks; "
                "call torchmoe.parallel.context_parallel.apply_cp in the plan"
            )
        self.moe_stats = MoEStepStats(
            whole, model, cfg.moe.num_experts, reduce=self.dims.meshes is not None
        )
        self.moe_layers = self.moe_stats.layers
        pp_group = self.dims.meshes.dense["pp"].get_group() if self.pipeline else None
        self.expert_bias = ExpertBiasUpdate(
            self.moe_layers,
            self.moe_stats.rows,
            self.moe_stats.num_layers,
            cfg.moe.bias_update_rate,
            pp_group,
        )

        self.optimizer = build_optimizer(model, cfg.optimizer, self.device, cached)
        # bfloat16 copies the micro-batches compute with (None: autocast casts the weights)
        self.cached_weights = CachedWeights(model, self.dtype) if cached else None
        self.lr_scheduler = build_lr_scheduler(self.optimizer, cfg.lr_scheduler, t.steps)
        dp_rank, dp = self.dims.dp_rank(), self.dims.dp
        train_docs, val_docs = open_training_and_validation(
            cfg.data, cfg.validation, dp_rank, dp, t.seed
        )
        # the same global batches at every layout, training and validation (loader.py)
        shape = (t.seq_len, t.local_batch_size, dp_rank, dp, t.seed, self.accum_steps)
        documents = cfg.model.attn_mask == "block_causal"  # the batches say where each starts
        self.dataloader = build_loader(
            train_docs, cfg.data, self.tokenizer, *shape, document_ids=documents
        )
        self.batches = iter(self.dataloader)  # the loader itself: a resume moves it in place
        self.global_tokens = t.local_batch_size * t.seq_len * self.dims.dp * self.accum_steps
        self.state = TrainState()
        self.checkpoint = CheckpointManager(
            cfg.checkpoint,
            Path(cfg.job.dump_folder) / cfg.checkpoint.folder,
            model,
            self.optimizer,
            self.lr_scheduler,
            self.dataloader,
            self.state,
            job=job,
            device=self.device,
        )
        self.metrics = MetricsLogger(cfg, flops, self.device, self.dtype, self.moe_stats.names)
        self.profiler = StepProfiler(
            cfg, self.device, dist.get_rank() if dist.is_initialized() else 0
        )
        self.loss_fn = build_loss_fn(cfg.compile.enable and not self.dims.tp_enabled)
        self.validator: Validator | None = None
        if val_docs is not None:
            self.validator = Validator(
                build_loader(val_docs, cfg.data, self.tokenizer, *shape, document_ids=documents),
                cfg.validation.steps * self.accum_steps,
                self._summed_eval_loss,
                self.device,
            )
        self.mtp = cfg.model.mtp_num_layers > 0
        self.freezer: ExpertFreezer | None = None  # set in train(), after a checkpoint loads

    def _materialize(self, model: nn.Module) -> None:
        """Allocate a parallelized meta model (or pipeline stage) on the device and
        initialise it, each parameter from a generator of its own (named_init.py): the same
        weights at every layout."""
        model.to_empty(device=self.device)
        with init_by_name(model, self.cfg.training.seed):
            model.init_weights(
                self.cfg.model.init_std, self.cfg.model.n_layers, buffer_device=self.device
            )

    @property
    def token_shards(self) -> int:
        """Forward passes that each see a different part of the step's tokens: micro-batches
        (gradient accumulation, pipeline) times the ranks of one pipeline stage (data and
        sequence-parallel ranks route different tokens)."""
        microbatches = microbatches_of(self.cfg) if self.pipeline else 1
        return self.accum_steps * microbatches * self.dims.world_size // self.dims.pp

    def _accumulation_steps(self) -> int:
        """Micro-batches per step; validate() checked that they divide evenly."""
        t = self.cfg.training
        if t.global_batch_size == -1:
            return 1
        return t.global_batch_size // (t.local_batch_size * self.dims.dp)

    def _log_model(self, model: nn.Module) -> None:
        cfg = self.cfg
        n_params = sum(p.numel() for p in model.parameters())
        experts = (
            "torch._grouped_mm"
            if use_grouped_mm(cfg.moe.grouped_mm, self.device)
            else "per-expert loop"
        )
        logger.info(
            "model %s/%s: %.3fB parameters on %s, compute %s, expert GEMMs: %s; %s",
            cfg.model.name,
            cfg.model.flavor,
            n_params / 1e9,
            self.device,
            self.dtype,
            experts,
            self.dims.describe(cfg.parallelism),
        )

    def train_step(self) -> StepResult:
        """One optimizer step over ``accum_steps`` micro-batches, then the expert-bias update.
        Balance and MTP losses are in the gradient; their values reach the log through
        ``StepResult.moe``."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.cached_weights is not None:
            self.cached_weights.zero_grad()
        # Balance losses are computed per token shard and averaged over the step's shards.
        set_aux_loss_scale(1.0 / self.token_shards)
        loss_mean = torch.zeros(1, device=self.device)
        batches = [next(self.batches) for _ in range(self.accum_steps)]
        if self.cfg.data.format != "text":  # prompts and user turns are no labels
            self.global_tokens = self._labels_in_step(batches)
        for i, batch in enumerate(batches):
            step = self._pipeline_step if self.pipeline else self._forward_backward
            loss_mean += step(*batch.to(self.device))
            if self.cached_weights is not None and self.accum_steps > 1:
                self.cached_weights.fold_grads(
                    last=i == len(batches) - 1, per_fold=self.cfg.training.grads_per_fold
                )
        if self.freezer is not None:
            self.freezer.zero_grads()
        meshes = self.dims.meshes
        params = list(self.model.parameters())
        max_norm, pp_group = (
            self.cfg.training.max_norm,
            meshes.dense["pp"].get_group() if self.pipeline else None,
        )
        # torchmoe's AdamW clips inside its update: no pass of its own over the gradients
        folds_clip = getattr(self.optimizer, "takes_grad_scale", False)
        if folds_clip:
            grads, squares = (
                self.cached_weights.norm_parts(params)
                if self.cached_weights is not None
                else ([p.grad for p in params if p.grad is not None], [])
            )
            grad_norm, clip_coef = grad_norm_and_clip_coef(
                grads, max_norm, pp_group, self.device, squares
            )
        else:
            grad_norm = clip_grad_norm_(params, max_norm, pp_group)
        if meshes:  # the ranks of the last pipeline stage hold the loss, the others add zero
            dist.all_reduce(loss_mean, group=meshes.loss.get_group())
        # The step's one host sync: the values the non-finite check and the log need.
        loss_value, norm_value = torch.cat([loss_mean, grad_norm.reshape(1).to(loss_mean)]).tolist()
        for what, value in (("loss", loss_value), ("gradient norm", norm_value)):
            if not math.isfinite(value):
                raise NonFiniteLossError(
                    f"{what} is {value} at step {self.state.step + 1}; stopping before the "
                    "update. Try a lower optimizer.lr, more lr_scheduler.warmup_steps or "
                    "training.max_norm > 0"
                )
        lr = self.lr_scheduler.get_last_lr()[0]
        if folds_clip:
            copies = self.cached_weights.copies if self.cached_weights is not None else None
            self.optimizer.step(grad_scale=clip_coef, copies=copies)
        else:
            self.optimizer.step()
        if self.freezer is not None:
            self.freezer.restore()
        self.lr_scheduler.step()
        return StepResult(loss_value, norm_value, lr, self._after_optimizer_step())

    def _labels_in_step(self, batches: list[Batch]) -> int:
        """Labels the loss counts in this step on every rank: the loss normaliser, so a
        masked loss is the single-process loss at every layout (one small all-reduce)."""
        [count] = self._per_data_rank_sum([sum(int((b.labels != IGNORE).sum()) for b in batches)])
        return max(count, 1)

    def _per_data_rank_sum(self, values: list[int]) -> list[int]:
        """``values`` summed over the data-parallel ranks, in one all-reduce over every rank:
        the ranks that share a data-parallel index (tp, pp) hold the same values, so the world
        sum is divided by their number."""
        if not dist.is_initialized():
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return [round(v * self.dims.dp / self.dims.world_size) for v in total.tolist()]

    def _after_optimizer_step(self) -> dict[str, torch.Tensor]:
        """The step's MoE and MTP buffers, summed over every rank in one all-reduce, drive the
        expert-bias update and become the step's statistics (``step_values``)."""
        if not self.moe_stats.enabled:
            return {}
        step = self.moe_stats.reduce(self.device)
        self.expert_bias.update(step.tokens_LE)
        with_bias = self.cfg.moe.enable_expert_bias and self.moe_stats.num_layers > 0
        bias_norm = self.expert_bias.norms(self.device) if with_bias else None
        return step_values(step, self.token_shards, bias_norm)

    def _forward_backward(
        self, inputs: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """One micro-batch through the whole model; returns its summed token loss over
        ``global_tokens``. Under context parallelism the model takes whole sequences and
        computes this rank's chunks of them (``positions``), which the loss compares with
        their labels."""
        cached = self.cached_weights
        with cached.swapped() if cached is not None else nullcontext():
            with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast):
                logits = self.model(inputs, **self._model_kwargs(labels, document_ids))
            with loss_parallel() if self.dims.tp_enabled else nullcontext():
                loss = self.loss_fn(logits, self._local_chunks(labels)) / self.global_tokens
                del logits  # backward needs the loss's own saved tensors only: free [B, S, V]
                loss.backward()
        return _full(loss.detach())

    def _model_kwargs(
        self, labels: torch.Tensor | None, document_ids: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """What the model takes besides the tokens: the labels for multi-token prediction,
        the documents for block-causal attention, the positions of context-parallel chunks
        (a pipeline's stages hold their own)."""
        kwargs = {"labels": labels} if self.mtp and labels is not None else {}
        if self.cp_positions is not None and self.pipeline is None:
            kwargs["positions"] = self.cp_positions
        return kwargs | ({} if document_ids is None else {"document_ids": document_ids})

    def _local_chunks(self, labels_BS: torch.Tensor) -> torch.Tensor:
        """This rank's chunks of the labels under context parallelism, else all of them."""
        return (
            labels_BS if self.cp_positions is None else shard_sequence(labels_BS, self.cp_positions)
        )

    def _summed_eval_loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The summed token loss of one batch and the labels it counts, forward only
        (validation, in eval mode): through the pipeline schedule under pipeline parallelism
        (zeros on ranks without the last stage), else through the model."""
        inputs, labels, document_ids = batch
        if self.pipeline is not None:
            scale, self.global_tokens = self.global_tokens, 1  # the schedule's loss divides by it
            try:
                loss = self._run_schedule(self.pipeline.schedule.eval, *batch)
            finally:
                self.global_tokens = scale
            counted = (self._local_chunks(labels) != IGNORE).sum()
            return loss, counted * int(self.pipeline.has_last)
        kwargs = self._model_kwargs(None, document_ids)  # no MTP loss in evaluation
        labels = self._local_chunks(labels)
        with (
            torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast),
            loss_parallel() if self.dims.tp_enabled else nullcontext(),
        ):
            loss = _full(self.loss_fn(self.model(inputs, **kwargs), labels))
        return loss, (labels != IGNORE).sum()  # prompts and user turns are no labels

    def _pipeline_step(
        self, inputs: torch.Tensor, labels: torch.Tensor, document_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """One local batch through the pipeline schedule (its micro-batches, forward and
        backward); returns the loss of the batch over ``global_tokens``, or zero on a rank
        without the last stage."""
        return self._run_schedule(self.pipeline.schedule.step, inputs, labels, document_ids)

    def _run_schedule(
        self,
        run: Callable[..., object],
        inputs: torch.Tensor,
        labels: torch.Tensor,
        document_ids: torch.Tensor | None,
    ) -> torch.Tensor:
        """``run`` (the schedule's ``step`` or ``eval``) over one local batch; the sum of the
        micro-batches' losses on ranks with the last stage, else zero."""
        p, losses = self.pipeline, []
        # stages check their inputs' strides against the static shapes they were built with
        inputs, labels = inputs.contiguous(), labels.contiguous()
        document_ids = None if document_ids is None else document_ids.contiguous()
        with (
            torch.autocast(self.device.type, dtype=self.dtype, enabled=self.autocast),
            loss_parallel() if self.dims.tp_enabled else nullcontext(),
        ):
            # keyword arguments reach every stage: the MTP modules of the last stage read the
            # labels, as the loss does; each stage builds its document mask. No outputs kept:
            # else the last stage holds every micro-batch's logits
            run(
                *([inputs] if p.has_first else []),
                target=self._local_chunks(labels).contiguous() if p.has_last else None,
                losses=losses,
                return_outputs=False,
                **self._model_kwargs(labels, document_ids),
            )
        return sum((_full(loss.detach()) for loss in losses), torch.zeros((), device=self.device))

    def train(self, stop: StopRequest | None = None) -> list[float]:
        """Run to ``training.steps``, or until a stop signal (preemption.py; ``stop`` when the
        caller routed the signals already, e.g. before building the Trainer): then save and
        return. Returns the loss of every step run here. Rank 0 holds the locks of the output
        folder and of a checkpoint folder outside it meanwhile (one run per folder:
        folder_lock.py)."""
        lead = is_lead()
        dump, checkpoints = Path(self.cfg.job.dump_folder), self.checkpoint.folder
        with ExitStack() as held:
            held.enter_context(folder_lock(dump, enabled=lead))
            outside = not checkpoints.resolve().is_relative_to(dump.resolve())
            if self.cfg.checkpoint.enable and outside:
                held.enter_context(folder_lock(checkpoints, lead, key="checkpoint.folder"))
            if stop is None:
                stop = held.enter_context(stop_signals())
            held.callback(self.dataloader.close)
            if self.validator is not None:
                held.callback(self.validator.close)
            held.callback(self.metrics.close)
            held.callback(self.profiler.stop)
            if self.dims.world_size > 1:  # a hung rank ends the job in minutes, named
                c = self.cfg.comm
                self.watchdog = Watchdog(c.init_timeout_s, c.train_timeout_s)
                held.callback(self.watchdog.close)
            return self._train(stop)

    def _train(self, stop: StopRequest) -> list[float]:
        cfg = self.cfg
        self.checkpoint.check_destination(self.n_params)
        resumed = self.checkpoint.load()  # restores self.state.step unless fresh or from a seed
        if cfg.checkpoint.create_seed_checkpoint:
            self.checkpoint.save_seed()
            return []
        self.metrics.start(resumed)
        if cfg.moe.freeze_experts:  # after loading: the frozen rows are the loaded ones
            self.freezer = ExpertFreezer(self.model, cfg.moe.freeze_experts)
        tokens_per_gpu = self.global_tokens // self.dims.world_size  # tp ranks share a batch
        losses = []
        first_step = self.state.step
        started = time.perf_counter()
        signum = stop.agreed()
        # the first step compiles and saves may take minutes: the init timeout ("slow")
        self._progress(f"step {first_step + 1} (the first: compiling, warming up)", slow=True)
        self.profiler.start(first_step)
        while not signum and self.state.step < cfg.training.steps:
            if self.state.step > first_step:
                self._progress(f"step {self.state.step + 1}", slow=False)
            result = self._step_or_oom()
            self.state.step += 1
            self.profiler.step(self.state.step)
            losses.append(result.loss)
            self.metrics.record_step(tokens_per_gpu, result.loss, result.moe)
            step = self.state.step
            signum = stop.agreed()
            # the run's first step is logged too: no silence until log_freq on a slow machine
            first, last = step == first_step + 1, step == cfg.training.steps
            val = self._validate(step, last)
            if step % cfg.metrics.log_freq == 0 or last or first or signum or val:
                bad_rows = self._data_rows()[1]  # the job's, as in the summary
                self.metrics.log(step, result.loss, result.grad_norm, result.lr, bad_rows, val)
            if self.checkpoint.due(step, cfg.training.steps) or signum:
                self._progress(f"saving checkpoint step-{step}", slow=True)
            self.checkpoint.maybe_save(step, cfg.training.steps)
        self._progress("finishing (the last checkpoint, the summary)", slow=True)
        if signum:
            self._stop(signal.Signals(signum).name, stop, first_step)
        self.checkpoint.finish()
        if losses:
            self._summary(losses, first_step, time.perf_counter() - started)
        return losses

    def _validate(self, step: int, last: bool) -> dict[str, float]:
        """The held-out loss when validation is due after ``step``, else {}."""
        v = self.cfg.validation
        if self.validator is None or not (step % v.freq == 0 or last):
            return {}
        self._progress(f"validating after step {step}", slow=True)
        return self.validator.run(self.model, step)

    def _step_or_oom(self) -> StepResult:
        """``train_step``; running out of device memory becomes one line (and a memory
        snapshot with profiling.enable_memory_snapshot)."""
        try:
            return self.train_step()
        except torch.OutOfMemoryError as e:
            snapshot = self.profiler.oom()
            raise StepOutOfMemoryError(
                f"step {self.state.step + 1} ran out of device memory ({first_line(e, 160)}); "
                "lower training.local_batch_size or training.seq_len, or set "
                "activation_checkpoint.mode = 'full'"
                + (f"; memory snapshot: {snapshot}" if snapshot else "")
            ) from None

    def _progress(self, doing: str, slow: bool) -> None:
        if self.watchdog is not None:
            self.watchdog.progress(doing, slow)

    def _summary(self, losses: list[float], first_step: int, seconds: float) -> None:
        """The run's last line: what ran, how the loss ended, where the outputs are."""
        best = min(range(len(losses)), key=losses.__getitem__)
        rows, bad = self._data_rows()
        where = [f"metrics in {self.metrics.jsonl}"] if self.metrics.jsonl else []
        if bad:
            where.insert(0, f"{bad} of {rows} data rows skipped as bad")
        if self.cfg.checkpoint.enable and self.checkpoint.saved_steps():
            where.insert(0, f"checkpoints in {self.checkpoint.folder}")
        logger.info(
            "done: steps %d-%d in %s; final loss %.4f, best %.4f at step %d%s",
            first_step + 1,
            self.state.step,
            duration(seconds),
            losses[-1],
            losses[best],
            first_step + 1 + best,
            "; " + ", ".join(where) if where else "",
        )

    def _data_rows(self) -> tuple[int, int]:
        """Data rows read and skipped over the whole job, every data-parallel rank."""
        rows, bad = self._per_data_rank_sum(list(row_counts(self.dataloader.state_dict())))
        return rows, bad

    def _stop(self, name: str, stop: StopRequest, first_step: int) -> None:
        """A stop signal: save the step just finished (unless saved already) and say so."""
        step = self.state.step
        if not self.cfg.checkpoint.enable:
            logger.warning("stopped by %s after step %d (checkpoint.enable = false)", name, step)
            return
        if step == first_step:
            logger.warning("stopped by %s before the first step: nothing new to save", name)
            return
        stop.doing = f"saving checkpoint step-{step}"
        self.checkpoint.save(step)
        self.checkpoint.finish()
        logger.warning(
            "stopped by %s after step %d: saved checkpoint step-%d; run the same command to resume",
            name,
            step,
            step,
        )
