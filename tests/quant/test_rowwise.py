"""The compiled rowwise quantization (what eager CUDA callers get) equals the plain one, serves
every size from one graph, and past dynamo's recompile limit runs eagerly instead of failing (a
training run on an H100 hit the limit with static shapes and fullgraph). Exercised on CPU,
where callers get the plain function."""

import torch
from torch._dynamo.utils import counters

from torchmoe.quant import rowwise


def _check(t: torch.Tensor) -> None:
    data, factor = rowwise._quantize_compiled(t, -1)
    want_data, want_factor = rowwise._quantize(t, -1)
    assert data.dtype == rowwise.FLOAT8 and torch.equal(data.float(), want_data.float())
    assert torch.equal(factor, want_factor)


def _tensor(*shape: int, seed: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = 10 ** torch.randn(*shape[:-1], 1, generator=g)  # rows of very different magnitudes
    return (torch.randn(*shape, generator=g) * rows).to(dtype)


def test_one_graph_serves_every_size() -> None:
    torch._dynamo.reset()
    counters.clear()
    for seed, (m, k) in enumerate([(24, 64), (96, 64), (7, 4000), (2048, 128), (64, 96)]):
        _check(_tensor(m, k, seed=seed))
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_past_the_recompile_limit_it_runs_eagerly() -> None:
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=1):
        _check(_tensor(24, 64, seed=0))
        _check(_tensor(64, 24, seed=1).t())  # another layout: a recompile past the limit
        _check(_tensor(3, 32, 48, seed=2))
        _check(_tensor(24, 64, seed=3, dtype=torch.float32))
