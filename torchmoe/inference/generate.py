"""Sampling text from a torchmoe model: batched prompts, greedy or temperature + top-p.

Prompts of different lengths share a batch right-padded: attention is causal, so a position
never sees the padding after it, and each prompt's next token is read at its own last
position. Every new token reruns the forward over the batch (no KV cache yet: cost grows with
the square of the length), which keeps the model code untouched and the result exact.
"""

from collections.abc import Collection, Sequence

import torch
from torch import nn


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
    for _ in range(max_new_tokens):
        width = int(lengths.max())
        logits = model(tokens[:, :width])
        nxt = sample(logits[rows, lengths - 1], temperature, top_p, g)
        for i in torch.nonzero(~done).flatten().tolist():
            new[i].append(int(nxt[i]))
        tokens[rows[~done], lengths[~done]] = nxt[~done]
        done |= torch.isin(nxt, stops)
        lengths = torch.where(done, lengths, lengths + 1)
        if bool(done.all()):
            break
    return new
