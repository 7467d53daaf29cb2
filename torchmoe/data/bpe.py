"""Byte-level BPE training, so the bundled tokenizer can be rebuilt offline from the repo alone.

The output is a list of token byte strings in rank order (the 256 single bytes, then one entry per
learned merge), which is exactly what a tiktoken ranks file stores: tiktoken then re-applies the
merges by rank at encode time.
"""

import base64
import heapq
import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex

from torchmoe.data.tokenizer import PRETOKENIZE_PATTERN

Pair = tuple[int, int]


def count_pieces(texts: Iterable[str]) -> Counter[bytes]:
    """How often each pre-token occurs, as UTF-8 bytes: merges are learned per unique piece,
    weighted by its count, which is far cheaper than walking the corpus."""
    pattern = regex.compile(PRETOKENIZE_PATTERN)
    counts: Counter[bytes] = Counter()
    for text in texts:
        counts.update(piece.encode("utf-8") for piece in pattern.findall(text))
    return counts


def train_bpe(texts: Iterable[str], vocab_size: int) -> list[bytes]:
    """Learn merges until there are ``vocab_size`` tokens; ValueError if the corpus runs out of
    pairs first. Ties between equally frequent pairs go to the smaller id pair, so the result
    depends only on the corpus."""
    if vocab_size < 256:
        raise ValueError(f"vocab_size {vocab_size} is below the 256 single bytes")
    counts = count_pieces(texts)
    words = [list(piece) for piece in counts]
    freqs = list(counts.values())
    vocab = [bytes([b]) for b in range(256)]
    id_of = {token: i for i, token in enumerate(vocab)}

    pair_count: dict[Pair, int] = defaultdict(int)
    words_with: dict[Pair, set[int]] = defaultdict(set)  # may hold stale entries; re-checked
    for w, word in enumerate(words):
        for pair in itertools.pairwise(word):
            pair_count[pair] += freqs[w]
            words_with[pair].add(w)
    # Max-heap of (-count, pair). Counts only grow through fresh pushes; an entry whose count
    # has since dropped is re-pushed with the true count when it surfaces.
    heap = [(-count, pair) for pair, count in pair_count.items()]
    heapq.heapify(heap)

    while len(vocab) < vocab_size:
        best = _pop_best(heap, pair_count)
        if best is None:
            raise ValueError(
                f"the corpus has no pairs left to merge at {len(vocab)} tokens; "
                f"give more text or a vocab_size <= {len(vocab)}"
            )
        merged = vocab[best[0]] + vocab[best[1]]
        new_id = id_of.get(merged)
        if new_id is None:  # the same bytes can arise from two different splits
            new_id = id_of[merged] = len(vocab)
            vocab.append(merged)
        changed: set[Pair] = set()
        for w in words_with.pop(best):
            new_word = _merge(words[w], best, new_id)
            if len(new_word) == len(words[w]):
                continue
            for pair in zip(words[w], words[w][1:]):
                pair_count[pair] -= freqs[w]
            for pair in itertools.pairwise(new_word):
                pair_count[pair] += freqs[w]
                words_with[pair].add(w)
                changed.add(pair)
            words[w] = new_word
        for pair in changed:
            heapq.heappush(heap, (-pair_count[pair], pair))
    return vocab


def _pop_best(heap: list[tuple[int, Pair]], pair_count: dict[Pair, int]) -> Pair | None:
    """The most frequent pair still present, skipping or refreshing stale heap entries."""
    while heap:
        neg_count, pair = heapq.heappop(heap)
        count = pair_count.get(pair, 0)
        if count == -neg_count and count > 0:
            return pair
        if 0 < count < -neg_count:
            heapq.heappush(heap, (-count, pair))
    return None


def _merge(word: list[int], pair: Pair, new_id: int) -> list[int]:
    """Replace each occurrence of ``pair``, left to right without overlaps, as tiktoken does."""
    out: list[int] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == pair[0] and word[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def write_ranks(tokens: list[bytes], path: Path) -> None:
    """Write a tiktoken ranks file: one '<base64 bytes> <rank>' line per token, in rank order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="ascii") as f:
        for rank, token in enumerate(tokens):
            f.write(f"{base64.b64encode(token).decode('ascii')} {rank}\n")
