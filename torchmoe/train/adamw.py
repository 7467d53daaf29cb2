"""torchmoe's AdamW: torch.optim.AdamW's arithmetic with the gradient-clipping coefficient folded
into the update and the moments optionally kept in bfloat16.

On one H100 the optimizer and clipping were a third of a compiled DeepSeek-V3-16B-L4 step: a
pass to scale the gradients, then torch's fused AdamW over float32 moments. Here each
parameter is one Triton kernel (``torchmoe/kernels/adamw.py``) that reads the clip coefficient
from device memory, and bfloat16 moments (Megatron's precision-aware optimizer keeps them so)
halve the state's memory and traffic; parameters stay float32 masters. Elsewhere (CPU, no
Triton) the same update runs in plain torch (``adamw_ref``).

State and parameter-group keys are torch.optim.AdamW's, so checkpoints move between the two.
DTensor parameters (FSDP2, EP, TP) are updated shard by shard: the moments share their
parameter's placement, and the update is elementwise.
"""

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from torchmoe.kernels import adamw_ref

try:
    from torchmoe.kernels import adamw as adamw_triton
except ImportError:  # no Triton on this platform: the torch update only
    adamw_triton = None

MOMENTS = ("exp_avg", "exp_avg_sq")
# torch.optim.AdamW's own group keys, held at the values this update implements
_TORCH_GROUP_KEYS = {
    "amsgrad": False,
    "maximize": False,
    "foreach": None,
    "capturable": False,
    "differentiable": False,
    "fused": None,
    "decoupled_weight_decay": True,
}


class WorkingCopy(Protocol):
    """A lower-precision copy of a parameter that forward and backward ran on
    (cached_weights.py): its gradient is the parameter's, and the update writes it."""

    copy: torch.Tensor

    @property
    def grad(self) -> torch.Tensor | None: ...

    def mark_current(self) -> None: ...


def storage_tensor(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor holding this rank's values of ``t``, which a kernel can address: a
    DTensor's local shard, and inside a wrapper subclass with one inner tensor of its shape
    (torchao's float8 expert weights) that inner tensor."""
    t = t.to_local() if isinstance(t, DTensor) else t
    while is_traceable_wrapper_subclass(t):
        names, _ = t.__tensor_flatten__()
        inner = getattr(t, names[0]) if len(names) == 1 else None
        if inner is None or inner.shape != t.shape:
            break
        t = inner
    return t


def kernel_can_address(tensors: Iterable[torch.Tensor | None]) -> bool:
    """Whether a kernel can take these tensors' data pointers: plain contiguous tensors and
    parameters of them. A wrapper subclass (a parameter of one has its type) has no data of
    its own: its pointer is not its values (an illegal memory access on the H100 with
    torchao's float8 weights)."""
    return all(
        type(t) in (torch.Tensor, nn.Parameter) and t.is_contiguous()
        for t in tensors
        if t is not None
    )


class AdamW(torch.optim.Optimizer):
    """AdamW whose ``step(grad_scale=...)`` multiplies every gradient by ``grad_scale`` (a
    one-element tensor on the parameters' device) inside the update; for a parameter in
    ``copies`` it reads the copy's gradient and writes the new copy in the same pass."""

    takes_grad_scale = True  # the trainer folds clipping into step() instead of scaling grads

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        betas: tuple[float, float],
        eps: float,
        weight_decay: float,
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        super().__init__(params, defaults | _TORCH_GROUP_KEYS)
        self.state_dtype = state_dtype
        self.register_load_state_dict_post_hook(_moments_in_state_dtype)

    @torch.no_grad()
    def step(
        self,
        closure: None = None,
        grad_scale: torch.Tensor | None = None,
        copies: Mapping[torch.Tensor, WorkingCopy] | None = None,
    ) -> None:
        if closure is not None:
            raise ValueError("torchmoe's AdamW takes no closure")
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                copy = copies.get(p) if copies is not None else None
                grad = p.grad if copy is None else copy.grad
                if grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    for key in MOMENTS:
                        state[key] = torch.zeros_like(p, dtype=self.state_dtype)
                state["step"] += 1
                tensors = [
                    storage_tensor(t) for t in (p, grad, state["exp_avg"], state["exp_avg_sq"])
                ]
                out = None if copy is None else copy.copy
                fused = (
                    adamw_triton is not None
                    and tensors[0].is_cuda
                    and kernel_can_address(tensors + [out])
                )
                update = adamw_triton.adamw_update if fused else adamw_ref.adamw_update
                update(
                    *tensors,
                    lr=float(group["lr"]),
                    beta1=beta1,
                    beta2=beta2,
                    eps=group["eps"],
                    weight_decay=group["weight_decay"],
                    step=int(state["step"].item()),  # a CPU tensor: no device sync
                    grad_scale=grad_scale,
                    copy=out,
                )
                if copy is not None:
                    copy.mark_current()


def _moments_in_state_dtype(optimizer: torch.optim.Optimizer) -> None:
    """After torch's load_state_dict: the moments back in our dtype (it casts them to the
    parameter's), the step counters back on the CPU (it moves them to the parameter's device
    when the saved groups say fused or capturable, as torch's fused AdamW saves them: a GPU
    counter would sync the host per parameter), and the group keys ours."""
    for group in optimizer.param_groups:
        group.update(_TORCH_GROUP_KEYS)
    for state in optimizer.state.values():
        for key in MOMENTS:
            if key in state and state[key].dtype != optimizer.state_dtype:
                state[key] = state[key].to(optimizer.state_dtype)
        if "step" in state:
            state["step"] = torch.as_tensor(state["step"], dtype=torch.float32, device="cpu")
