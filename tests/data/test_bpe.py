import itertools
import random
import string
from collections import Counter
from pathlib import Path

import pytest
import regex

from torchmoe.data.bpe import count_pieces, train_bpe, write_ranks
from torchmoe.data.tokenizer import PRETOKENIZE_PATTERN, build_tokenizer


def naive_bpe(texts: list[str], vocab_size: int) -> list[bytes]:
    """Reference: recount every pair before each merge, same tie rule (smallest id pair)."""
    counts = count_pieces(texts)
    words = {tuple(piece): n for piece, n in counts.items()}
    vocab = [bytes([b]) for b in range(256)]
    while len(vocab) < vocab_size:
        pairs: Counter[tuple[int, int]] = Counter()
        for word, n in words.items():
            for pair in itertools.pairwise(word):
                pairs[pair] += n
        a, b = min(pairs, key=lambda p: (-pairs[p], p))
        merged = vocab[a] + vocab[b]
        if merged not in vocab:
            vocab.append(merged)
        new_id = vocab.index(merged)
        new_words: Counter[tuple[int, ...]] = Counter()
        for word, n in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == (a, b):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += n
        words = new_words
    return vocab


def random_corpus(rng: random.Random, n_docs: int) -> list[str]:
    words = ["".join(rng.choices("abcdefgh", k=rng.randint(2, 8))) for _ in range(80)]
    return [
        " ".join(rng.choices(words, k=rng.randint(5, 30))) + rng.choice([".", "\n", " 123"])
        for _ in range(n_docs)
    ]


def test_incremental_counts_match_full_recount(rng: random.Random) -> None:
    corpus = random_corpus(rng, 60)
    assert train_bpe(corpus, 320) == naive_bpe(corpus, 320)


def test_frequent_word_becomes_one_token(rng: random.Random, tmp_path: Path) -> None:
    word = "".join(rng.choices(string.ascii_lowercase, k=9))
    noise = [
        "".join(rng.choices(string.ascii_letters + string.digits + ",.;", k=40)) for _ in range(20)
    ]
    corpus = [f"the {word} is here, {word} again" for _ in range(30)] + noise
    tokens = train_bpe(corpus, 300)
    assert len(tokens) == 300 and len(set(tokens)) == 300
    assert tokens[:256] == [bytes([b]) for b in range(256)]
    path = tmp_path / "tiny.tiktoken"
    write_ranks(tokens, path)
    tokenizer = build_tokenizer(str(path))
    assert tokenizer.vocab_size == 301
    assert tokenizer.encode(f" {word}") == [tokens.index(f" {word}".encode())]
    for doc in corpus:
        assert tokenizer.decode(tokenizer.encode(doc)) == doc


def test_every_learned_token_encodes_to_itself(rng: random.Random, tmp_path: Path) -> None:
    """tiktoken re-derives the segmentation from ranks alone; each learned piece must come back
    as its own single token, or training and encoding disagree."""
    tokens = train_bpe(random_corpus(rng, 80), 350)
    path = tmp_path / "t.tiktoken"
    write_ranks(tokens, path)
    tokenizer = build_tokenizer(str(path))
    checked = 0
    for rank, token in enumerate(tokens[256:], start=256):
        text = token.decode()
        if regex.findall(PRETOKENIZE_PATTERN, text) == [text]:
            assert tokenizer.encode(text) == [rank]
            checked += 1
    assert checked > 50


def test_too_small_corpus_is_an_error() -> None:
    # Merges: ab, " ab", " abab"; then every piece is a single token.
    with pytest.raises(ValueError, match="no pairs left to merge at 259 tokens"):
        train_bpe(["ab ab abab"], 300)
