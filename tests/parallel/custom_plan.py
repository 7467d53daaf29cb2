"""A user's plan, as the README's example shows: reuse the default, then adjust."""

from torchmoe.parallel.plans import parallelize

CALLS = []


def my_parallelize(model, parallel_dims, job_config):
    CALLS.append(parallel_dims.world_size)
    return parallelize(model, parallel_dims, job_config)


def copying_parallelize(model, parallel_dims, job_config):
    """A broken plan: returns a copy instead of transforming the model in place."""
    import copy

    return copy.deepcopy(model)


def fsdp_only(model, parallel_dims, job_config):
    """A plan that forgets context parallelism: FSDP over the dense mesh, nothing else."""
    import torch

    from torchmoe.parallel.fsdp import apply_fsdp

    meshes = parallel_dims.meshes
    apply_fsdp(model, meshes.dp_mesh(), None, torch.float32, torch.float32)
    return model
