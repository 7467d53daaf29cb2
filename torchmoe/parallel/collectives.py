"""Autograd-aware functional collectives under one name on every supported torch: 2.13 renamed
``all_gather_tensor_autograd`` / ``reduce_scatter_tensor_autograd`` to ``*_single_autograd``
and warns on every call of the old names; 2.11 (the GPU image) has only the old ones."""

from torch.distributed import _functional_collectives as funcol

all_gather_autograd = (
    getattr(funcol, "all_gather_single_autograd", None) or funcol.all_gather_tensor_autograd
)
reduce_scatter_autograd = (
    getattr(funcol, "reduce_scatter_single_autograd", None) or funcol.reduce_scatter_tensor_autograd
)
