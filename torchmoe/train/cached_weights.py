"""bfloat16 copies of the float32 weights that one-process training computes with
(``training.compute_weights = "cached"``).

Under autocast every micro-batch casts each float32 weight to bfloat16 in forward and its
bfloat16 gradient back to float32 in backward: 12 bytes of memory traffic per parameter (on one
H100, DeepSeek-V3-16B-L4 went from 82,701 to 89,012 tokens/s without them). Here each weight
autocast would cast keeps a bfloat16 copy beside its float32 master. For a micro-batch the
copies are swapped into their modules, so forward and backward run on them with no cast;
their gradients stay bfloat16 (summed in float32 across micro-batches, as autocast's float32
gradients would be); torchmoe's AdamW reads those gradients and writes the new copy in the
kernel that updates the master. The arithmetic is autocast's: the same bfloat16 weights, the
same bfloat16 gradients.

The masters stay the model's parameters, outside the swap: checkpoints, validation, generation
and export see the float32 weights as before. An in-place write to a master other than the
optimizer's (``copy_``, a DCP checkpoint load) bumps its version counter, and its copy is made
again before the next micro-batch. Writes through ``.data`` bump nothing and must not be used
on a training model; a master replaced by another tensor is refused at the next swap.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType

import torch
from torch import nn

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig
from torchmoe.config.validate import cached_weights_conflict, check_cached_weights
from torchmoe.kernels import grad_fold_ref
from torchmoe.models.moe.experts import GroupedExperts
from torchmoe.quant.float8_linear import Float8Linear
from torchmoe.train.optim import resolve_implementation

try:
    from torchmoe.kernels import grad_fold
except ImportError:  # no Triton on this platform: the torch fold only
    grad_fold = None


def wants_cached_weights(
    cfg: JobConfig, autocast: bool, world_size: int, device: torch.device
) -> bool:
    """``training.compute_weights`` for this run; "cached" where it cannot run is a ConfigError
    (config/validate.py refused the static cases already)."""
    mode = cfg.training.compute_weights
    if mode == "cast":
        return False
    applies = autocast and world_size == 1
    if mode == "cached":
        check_cached_weights(cfg, world_size)
        if not applies:
            raise ConfigError(
                "training.compute_weights = 'cached' needs bfloat16 compute under autocast; this "
                "run computes in float32 (training.mixed_precision_param); set it to 'auto' or "
                "'cast'"
            )
        return True
    return (
        applies
        and cached_weights_conflict(cfg, world_size) is None
        and resolve_implementation(cfg.optimizer, device, cached_weights=False) == "torchmoe"
    )


def fold_implementation(grads: list[torch.Tensor], total: torch.Tensor | None) -> ModuleType:
    """The Triton fold where it runs (CUDA, contiguous tensors), else the torch reference."""
    fused = (
        grad_fold is not None
        and grads[0].is_cuda
        and all(t.is_contiguous() for t in grads)
        and (total is None or total.is_contiguous())
    )
    return grad_fold if fused else grad_fold_ref


def fold_bytes(accum_steps: int, per_fold: int) -> int:
    """Bytes per parameter that gradient folds add to cached weights' model state at its peak,
    a fold (a 2-byte copy and 2-byte gradients replace float32 gradients: no change without
    accumulation): the float32 sums (4) and the gradients waiting for it (2 each)."""
    if accum_steps == 1:
        return 0
    return 4 + 2 * (min(per_fold, accum_steps) - 1)


@dataclass
class WeightCopy:
    """One master's copy, where the model holds the master, and its gradient."""

    master: nn.Parameter
    copy: nn.Parameter
    owners: list[tuple[nn.Module, str]]  # (module, attribute) holding the master
    version: int = -1  # the master's version counter when the copy was last made from it
    grad_sum: torch.Tensor | None = None  # float32 sum of earlier micro-batches' gradients
    # micro-batches' bfloat16 gradients not yet in the sum
    waiting: list[torch.Tensor] = field(default_factory=list)
    # the float32 sum of the finished sum's squares, when the step's last fold computed it
    square_sum: torch.Tensor | None = None

    @property
    def grad(self) -> torch.Tensor | None:
        """The step's gradient of the master: the float32 sum under accumulation (after the
        step's last fold), else the copy's own."""
        return self.copy.grad if self.grad_sum is None else self.grad_sum

    def fold(self, last: bool, per_fold: int = 2) -> None:
        """Move the copy's bfloat16 gradient toward the float32 sum, ``per_fold`` at a time:
        gradients wait until that many are there, then go in together in one pass (which reads
        and writes the sum once for all of them); the step's ``last`` micro-batch folds
        whatever waits, and the Triton kernel also takes the sum of squares for the norm."""
        g, self.copy.grad = self.copy.grad, None
        if g is not None:
            self.waiting.append(g)
        if not self.waiting or (len(self.waiting) < per_fold and not last):
            return
        grads, self.waiting = self.waiting, []
        fold = fold_implementation(grads, self.grad_sum)
        # the kernel sums the squares in its pass; the reference would need a pass of its own
        # and a summation order other than the norm's (CPU training stays autocast's exactly)
        self.grad_sum, self.square_sum = fold.fold(
            self.grad_sum, grads, squares=last and fold is not grad_fold_ref
        )

    def mark_current(self) -> None:
        """The optimizer wrote the copy from the updated master."""
        self.version = self.master._version


class CachedWeights:
    """The copies of ``model``'s weights that autocast would cast to ``dtype``: nn.Linear
    weights and biases and the routed experts' weights, outside modules marked
    ``autocast_exempt`` (the router computes in ``moe.router_dtype``), when every module
    holding the parameter is one of those."""

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        exempt = {
            id(m)
            for e in model.modules()
            if getattr(e, "autocast_exempt", False)
            for m in e.modules()
        }
        owners: dict[nn.Parameter, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    owners.setdefault(p, []).append((module, name))
        self.copies: dict[nn.Parameter, WeightCopy] = {}
        for p, uses in owners.items():
            if (
                p.requires_grad
                and p.dtype == torch.float32
                and type(p.data) is torch.Tensor  # not a DTensor or a quantized subclass
                and all(_computes_in_autocast(m, exempt) for m, _ in uses)
            ):
                copy = nn.Parameter(torch.empty_like(p, dtype=dtype))
                self.copies[p] = WeightCopy(p, copy, uses)
        self.refresh()

    def __len__(self) -> int:
        return len(self.copies)

    @torch.no_grad()
    def refresh(self) -> None:
        """Make again every copy whose master changed since it was made."""
        for c in self.copies.values():
            if c.master._version != c.version:
                c.copy.copy_(c.master)
                c.mark_current()

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """The copies in the masters' places (forward and backward of one micro-batch)."""
        self.refresh()
        self._place(lambda c: c.master, lambda c: c.copy)
        try:
            yield
        finally:
            self._place(lambda c: c.copy, lambda c: c.master)

    def _place(
        self,
        held: Callable[[WeightCopy], nn.Parameter],
        put: Callable[[WeightCopy], nn.Parameter],
    ) -> None:
        """Every owner's ``held(c)`` replaced by ``put(c)``; nothing replaced if any owner holds
        something else."""
        slots = [(module, name, c) for c in self.copies.values() for module, name in c.owners]
        for module, name, c in slots:
            if module._parameters[name] is not held(c):
                raise RuntimeError(
                    f"{type(module).__name__}.{name} was replaced after its bfloat16 copy was "
                    "made (load_state_dict(assign=True)?); load weights in place, or set "
                    "training.compute_weights = 'cast'"
                )
        for module, name, c in slots:
            module._parameters[name] = put(c)

    def fold_grads(self, last: bool, per_fold: int) -> None:
        """After a micro-batch's backward under accumulation: its bfloat16 gradients toward the
        float32 sums (``WeightCopy.fold``), so later micro-batches' do not round them; after
        the step's ``last`` micro-batch every sum is complete."""
        for c in self.copies.values():
            if c.copy.grad is not None or c.waiting:
                c.fold(last, per_fold)

    def grads(self, params: list[nn.Parameter]) -> list[torch.Tensor]:
        """The step's gradient of each of ``params`` that has one (a copy's where it has one)."""
        found = (self.copies[p].grad if p in self.copies else p.grad for p in params)
        return [g for g in found if g is not None]

    def norm_parts(
        self, params: list[nn.Parameter]
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(the gradients of ``params`` whose squares are still to be summed, the sums of
        squares the step's last folds already took): together, the gradient norm's inputs."""
        squares, rest = [], []
        for p in params:
            c = self.copies.get(p)
            if c is not None and c.square_sum is not None:
                squares.append(c.square_sum)
            else:
                rest.append(p)
        return self.grads(rest), squares

    def zero_grad(self) -> None:
        for c in self.copies.values():
            c.copy.grad, c.grad_sum, c.waiting, c.square_sum = None, None, [], None


def _computes_in_autocast(module: nn.Module, exempt: set[int]) -> bool:
    """Whether autocast casts this module's parameters to its dtype for compute: a plain
    nn.Linear (or torchmoe's float8 one, which casts like it) or the routed experts, not inside
    a module that turns autocast off (marked ``autocast_exempt``, as the router is)."""
    if id(module) in exempt:
        return False
    return isinstance(module, GroupedExperts) or type(module) in (nn.Linear, Float8Linear)
