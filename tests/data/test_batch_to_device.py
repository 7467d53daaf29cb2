"""Batch.to: every tensor arrives with its values (None stays None); on a GPU through pinned
memory without blocking, still the values of each batch after many are in flight."""

import pytest
import torch

from torchmoe.data.prefetch import Batch


def _batch(seed: int, documents: bool) -> Batch:
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randint(0, 50_000, (4, 64), generator=g)
    labels = torch.randint(-100, 50_000, (4, 64), generator=g)
    doc = torch.randint(0, 3, (4, 64), generator=g) if documents else None
    return Batch(inputs, labels, doc)


@pytest.mark.parametrize("documents", [False, True])
def test_batch_to_the_cpu_keeps_every_tensor(documents):
    batch = _batch(0, documents)
    moved = batch.to(torch.device("cpu"))
    for a, b in zip(batch, moved, strict=True):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_batches_copied_to_the_gpu_without_blocking_arrive_intact():
    cuda = torch.device("cuda")
    batches = [_batch(seed, documents=True) for seed in range(32)]
    busy = torch.randn(4096, 4096, device=cuda)
    for _ in range(20):  # queue work ahead of the copies
        busy = busy @ busy / 64
    moved = [b.to(cuda) for b in batches]
    torch.cuda.synchronize()
    for batch, on_gpu in zip(batches, moved, strict=True):
        for a, b in zip(batch, on_gpu, strict=True):
            assert b.is_cuda and torch.equal(a, b.cpu())
    again = moved[0].to(cuda)  # already there: nothing to pin
    assert all(torch.equal(a, b) for a, b in zip(moved[0], again, strict=True))
