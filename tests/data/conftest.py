"""Shared fixtures: a fresh random generator per test and the (slow-ish) stdlib corpus, built once
per session into a temporary cache so no test touches ~/.cache."""

import random
from collections.abc import Callable
from pathlib import Path

import pytest

from torchmoe.data.stdlib_docs import load_stdlib_docs
from torchmoe.data.tokenizer import Tokenizer, build_tokenizer


@pytest.fixture(scope="session")
def stdlib_cache(data_cache: str) -> Path:
    """The session cache of tests/conftest.py, so the whole suite generates the corpus once."""
    return Path(data_cache)


@pytest.fixture(scope="session")
def stdlib_docs(stdlib_cache: Path) -> list[str]:
    return load_stdlib_docs(str(stdlib_cache))


@pytest.fixture(scope="session")
def bundled() -> Tokenizer:
    return build_tokenizer("bundled")


@pytest.fixture
def random_text(rng: random.Random) -> Callable[[int], str]:
    """Makes text mixing ASCII, whitespace runs, digits, other scripts, emoji, combining marks and
    special-token look-alikes: the cases where byte-level tokenizers tend to break."""
    pieces = [
        "the",
        "Return",
        " value",
        "__init__",
        "x=1;",
        "12345678",
        "  ",
        "\n",
        "\n\n",
        "\t",
        "\r\n",
        "é",
        "naïve",
        "中文",
        "日本語",
        "🙂",
        "👩‍💻",
        "e\u0301",
        "\u200b",
        "мир",
        "عربى",
        "<|endoftext|>",
        "<|fim_prefix|>",
        "'s",
        "'ll",
        "!!",
        "...",
        "\\",
        "\x00",
        "\u2028",
    ]

    def make(length: int) -> str:
        out = []
        for _ in range(length):
            if rng.random() < 0.3:
                out.append(
                    chr(
                        rng.choice(
                            [
                                rng.randrange(32, 127),
                                rng.randrange(0xA0, 0x3000),
                                rng.randrange(0x1F300, 0x1FAFF),
                            ]
                        )
                    )
                )
            else:
                out.append(rng.choice(pieces))
        return "".join(out)

    return make
