"""A key/value cache for generation: each block keeps what its attention needs of the tokens
already seen, so a new token costs one position's forward, not the whole prefix again.

Rows of a batch advance independently: each new token has its own position (``positions``
[B, s]); it is written there, and a query sees the cached keys at or before its position.
Prompts of different lengths are therefore prefilled right-padded: the padding's entries sit
past each prompt's end, unseen, and are overwritten by the row's next tokens.

What a block caches is its attention's choice (``LayerCache`` holds two tensors): GQA its keys
and values (after rotary), MLA its normalised latent and its rotary key, which are
(kv_lora_rank + qk_rope_head_dim) numbers per token instead of 2 x heads x head dims.
"""

import torch

from torchmoe.models.common.document_mask import AttentionMask


class LayerCache:
    """One block's two cached streams, [B, T, ...] each, allocated at the first write."""

    def __init__(self, cache: "KVCache") -> None:
        self.cache = cache
        self.first: torch.Tensor | None = None
        self.second: torch.Tensor | None = None

    def update(
        self, first: torch.Tensor, second: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new tokens' entries [B, s, ...] at their positions; return the whole
        cache [B, T, ...] of each stream."""
        if self.first is None or self.second is None:
            self.first = self._empty(first)
            self.second = self._empty(second)
        rows, positions = self.cache.rows, self.cache.positions
        self.first[rows, positions] = first.to(self.first.dtype)
        self.second[rows, positions] = second.to(self.second.dtype)
        return self.first, self.second

    def _empty(self, like: torch.Tensor) -> torch.Tensor:
        B, T = like.shape[0], self.cache.max_len
        return torch.zeros(B, T, *like.shape[2:], dtype=like.dtype, device=like.device)

    @property
    def visible(self) -> AttentionMask:
        """[B, 1, s, T]: query i of row b sees the cached keys at positions <= its own."""
        return self.cache.visible


class KVCache:
    """The cache of every block for a batch of ``max_len`` positions. Before each forward,
    ``at(positions)`` says where the new tokens go."""

    def __init__(self, n_layers: int, max_len: int) -> None:
        self.max_len = max_len
        self.layers = [LayerCache(self) for _ in range(n_layers)]
        self.positions = torch.zeros(0, 0, dtype=torch.long)
        self.rows = self.positions
        self.visible = torch.zeros(0, dtype=torch.bool)

    def at(self, positions_BS: torch.Tensor) -> "KVCache":
        last = int(positions_BS.max())
        if last >= self.max_len:
            raise ValueError(f"position {last} is past the cache's {self.max_len} positions")
        self.positions = positions_BS
        self.rows = torch.arange(positions_BS.shape[0], device=positions_BS.device)[:, None]
        keys = torch.arange(self.max_len, device=positions_BS.device)
        self.visible = (keys[None, None, :] <= positions_BS[:, :, None])[:, None]
        return self
