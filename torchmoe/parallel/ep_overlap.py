"""Expert-parallel communication hidden behind the other micro-batch's compute, in DualPipeV's
overlapped steps (``parallelism.pp_ep_overlap``; DeepSeek-V3's DualPipe overlap, Megatron's
``--overlap-moe-expert-parallel-comm``).

DualPipeV pairs the forward of one micro-batch (one stage) with the backward of another (the
rank's other stage) in ``OVERLAP_F_B`` actions, which torch runs one after the other. Here
they run in two threads that take turns (a baton): each hands the turn over right after it
issues an expert-parallel all-to-all (the dispatch and combine exchanges, and their backward),
before anything waits on it. The other thread then queues its compute behind that exchange on
the device, so the exchange runs while the GPU computes the other micro-batch.

One thread runs at a time, so every collective is issued in the same order on every rank (FSDP's,
the expert exchanges, the balance loss's), and the two micro-batches never touch shared state at
once. A thread that finishes (or fails) releases the other, which runs on alone; a stage
without MoE layers just runs its whole action in one turn. Outside these actions the hand-over
is a no-op.
"""

import inspect
import threading
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.distributed import _functional_collectives as funcol

from torchmoe.models.moe.moe import MoE
from torchmoe.parallel.expert_parallel import ExpertParallelDispatcher

if TYPE_CHECKING:
    from torch.distributed.pipelining.schedules import _Action, _PipelineContext

FORWARD_ROLE, BACKWARD_ROLE = "forward", "backward"


class Baton:
    """Two threads, one turn: ``hand_over`` passes it to the other thread (unless that one has
    finished) and waits to get it back. ``turns`` records who handed over, in order."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._turn: str | None = None  # None: no overlapped action is running
        self._finished: set[str] = set()
        self._thread = threading.local()  # .role of the two threads run() starts
        self.turns: deque[str] = deque(maxlen=256)  # the latest hand-overs' roles (tests)

    def run(self, forward: Callable[[], None], backward: Callable[[], None]) -> None:
        """``forward`` and ``backward`` in two threads taking turns, ``forward`` first;
        returns when both are done and raises the first error either raised."""
        errors: list[BaseException] = []

        def body(role: str, fn: Callable[[], None]) -> None:
            self._thread.role = role
            with self._cv:
                self._cv.wait_for(lambda: self._turn == role)
            try:
                fn()
            except BaseException as e:  # re-raised in the calling thread
                errors.append(e)
            finally:
                with self._cv:
                    self._finished.add(role)
                    self._turn = _other(role)
                    self._cv.notify_all()
                self._thread.role = None

        with self._cv:
            self._turn, self._finished = FORWARD_ROLE, set()
        thread = threading.Thread(target=body, args=(BACKWARD_ROLE, backward), daemon=True)
        thread.start()
        try:
            body(FORWARD_ROLE, forward)
            thread.join()
        finally:
            with self._cv:
                self._turn = None
        if errors:
            raise errors[0]

    def hand_over(self) -> None:
        """Let the other thread run until it hands back. The caller is the thread ``run``
        started, or on CUDA autograd's device thread running the backward thread's pass."""
        with self._cv:
            if self._turn is None:
                return
            role = getattr(self._thread, "role", None) or (
                BACKWARD_ROLE if torch._C._current_graph_task_id() != -1 else FORWARD_ROLE
            )
            other = _other(role)
            if other in self._finished:
                return
            self.turns.append(role)
            self._turn = other
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._turn == role)


def _other(role: str) -> str:
    return BACKWARD_ROLE if role == FORWARD_ROLE else FORWARD_ROLE


BATON = Baton()


class _HandingOverExchange(torch.autograd.Function):
    """``all_to_all_single`` that hands the turn over once the exchange is issued, in forward
    and in backward; the result is waited for where it is first used."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = funcol.all_to_all_single(x, out_splits, in_splits, group)
        BATON.hand_over()
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = funcol.all_to_all_single(grad.contiguous(), in_splits, out_splits, ctx.group)
        BATON.hand_over()
        return grad_in, None, None, None


def handing_over_exchange(x, out_splits, in_splits, group) -> torch.Tensor:
    """The expert-parallel dispatchers' token exchange, with hand-overs (``exchange``)."""
    return _HandingOverExchange.apply(x, out_splits, in_splits, group)


def apply_ep_overlap(schedule, parts: list[nn.Module]) -> None:
    """Run ``schedule``'s OVERLAP_F_B actions as two turn-taking threads and make the
    expert-parallel dispatchers of ``parts`` hand over after each exchange. torch's runtime
    internals are imported here, so a torch that moved them fails only runs that ask for it."""
    from torch.distributed.pipelining.schedules import OVERLAP_F_B

    for part in parts:
        for moe in (m for m in part.modules() if isinstance(m, MoE)):
            if isinstance(moe.dispatcher, ExpertParallelDispatcher):
                moe.dispatcher.exchange = handing_over_exchange
    schedule.register_custom_function(OVERLAP_F_B, _OverlappedSteps(schedule))


class _OverlappedSteps:
    """The OVERLAP_F_B function: what torch's runtime does for the action's FORWARD and
    FULL_BACKWARD sub-actions (torch 2.11-2.13's private runtime: its receives, loss and
    hand-offs between the two stages of one rank), in two turn-taking threads. torch hands a
    custom function only the micro-batches, so it wraps the schedule's step to keep the step's
    options (``return_outputs``: the trainer's False frees the last stage's logits;
    ``loss_kwargs``)."""

    def __init__(self, schedule) -> None:
        self._step = schedule._step_microbatches
        self._step_signature = inspect.signature(self._step)
        chunk_args = inspect.signature(schedule._stages[0].forward_one_chunk).parameters
        self._takes_save_flag = "save_forward_output" in chunk_args
        self._options: dict = {}
        schedule._step_microbatches = self._recording_step

    def _recording_step(self, *args, **kwargs):
        bound = self._step_signature.bind(*args, **kwargs)
        bound.apply_defaults()
        self._options = dict(bound.arguments)
        return self._step(*args, **kwargs)

    def __call__(self, action: "_Action", ctx: "_PipelineContext") -> None:
        from torch.distributed.pipelining.schedules import FORWARD, FULL_BACKWARD, _wait_batch_p2p

        schedule = ctx.schedule_ref
        stages = {s.stage_index: s for s in schedule._stages}
        fwd, bwd = action.sub_actions
        if (fwd.computation_type, bwd.computation_type) != (FORWARD, FULL_BACKWARD):
            raise RuntimeError(f"parallelism.pp_ep_overlap: unexpected overlapped action {action}")
        keep = (
            {"save_forward_output": self._options["return_outputs"]}
            if self._takes_save_flag
            else {}
        )
        loss_kwargs = (self._options["loss_kwargs"],) if "loss_kwargs" in self._options else ()

        def forward() -> None:
            stage, mb = stages[fwd.stage_index], fwd.microbatch_index
            schedule._assert_unsharded(stage)
            if not stage.is_first and fwd.stage_index - 1 not in stages:
                _wait_batch_p2p(schedule.fwd_recv_ops.pop((fwd.stage_index, mb)))
            output = stage.forward_one_chunk(mb, ctx.arg_mbs[mb], ctx.kwarg_mbs[mb], **keep)
            schedule._maybe_compute_loss(stage, output, ctx.target_mbs, mb, *loss_kwargs)
            if fwd.stage_index + 1 in stages:
                stages[fwd.stage_index + 1].set_local_fwd_input(output, mb)

        def backward() -> None:
            stage, mb = stages[bwd.stage_index], bwd.microbatch_index
            schedule._assert_unsharded(stage)
            if not stage.is_last and bwd.stage_index + 1 not in stages:
                _wait_batch_p2p(schedule.bwd_recv_ops.pop((bwd.stage_index, mb)))
            loss = schedule._maybe_get_loss(stage, mb)
            schedule.backward_counter[bwd.stage_index] += 1
            last = schedule.backward_counter[bwd.stage_index] == schedule._n_microbatches
            stage.backward_one_chunk(mb, loss=loss, full_backward=True, last_backward=last)
            if bwd.stage_index - 1 in stages:
                previous = stages[bwd.stage_index - 1]
                previous.set_local_bwd_input(stage.get_local_bwd_output(mb), mb)

        BATON.run(forward, backward)
