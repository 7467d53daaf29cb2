"""Sampling text from a torchmoe model: batched prompts, greedy or temperature + top-p.

With the KV cache (the default) the prompts are read once, right-padded to the longest, and
every new token costs one position's forward: each row writes its token at its own position
and attends to the cached positions before it (models/common/kv_cache.py; MLA caches its
latent). Without it every new token reruns the forward over the whole batch, right-padded
(causal attention keeps the padding after a position unseen): the cost grows with the square
of the length, but it is the training forward itself, the reference the cache is tested
against.
"""

from collections.abc import Collection, Sequence

import torch
from torch import nn

from torchmoe.models.common.kv_cache import KVCache


def sample(logits_BV: torch.Tensor, temperature: float, top_p: float, g: torch.Generator | None):
    """The next token of each row: argmax at temperature 0, else a draw from the smallest set
    of tokens whose probability reaches top_p."""
    if temperature == 0:
        return logits_BV.argmax(-1)
    probs = torch.softmax(logits_BV.float() / temperature, -1)
    sorted_probs, order = probs.sort(-1, descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the tokens ranked above
    sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
    pick = torch.multinomial(sorted_probs, 1, generator=g).squeeze(-1)
    return order.gather(-1, pick[:, None]).squeeze(-1)


@torch.no_grad()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    stop_ids: Collection[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    pad_id: int = 0,
    kv_cache: bool = True,
) -> list[list[int]]:
    """The new tokens of each prompt, up to ``max_new_tokens`` or a stop token (included:
    the tokenizer's EOS, and those generation_config.json lists)."""
    device = next(model.parameters()).device
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    total = int(lengths.max()) + max_new_tokens
    tokens = torch.full((len(prompts), total), pad_id, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(list(p), device=device)
    g = torch.Generator(device=device).manual_seed(seed) if temperature else None
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    new: list[list[int]] = [[] for _ in prompts]
    rows = torch.arange(len(prompts), device=device)
    stops = torch.tensor(sorted(stop_ids), device=device)
    cache = KVCache(len(model.layers), total) if kv_cache else None
    for step in range(max_new_tokens):
        if cache is None:
            logits = model(tokens[:, : int(lengths.max())])[rows, lengths - 1]
        elif step == 0:  # the prompts, padded to the longest
            width = int(lengths.max())
            positions = torch.arange(width, device=device).expand(len(prompts), width)
            logits = model(tokens[:, :width], cache=cache.at(positions))[rows, lengths - 1]
        else:  # each row's last token, at its own position
            positions = (lengths - 1)[:, None]
            logits = model(tokens[rows, lengths - 1][:, None], cache=cache.at(positions))[:, -1]
        nxt = sample(logits, temperature, top_p, g)
        for i in torch.nonzero(~done).flatten().tolist():
            new[i].append(int(nxt[i]))
        tokens[rows[~done], lengths[~done]] = nxt[~done]
        done |= torch.isin(nxt, stops)
        lengths = torch.where(done, lengths, lengths + 1)
        if bool(done.all()):
            break
    return new
