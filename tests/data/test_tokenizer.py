import base64
import unicodedata
from collections.abc import Callable
from pathlib import Path

import pytest
import regex
import tiktoken

from torchmoe.config.errors import ConfigError
from torchmoe.data.tokenizer import EOS_TOKEN, PRETOKENIZE_PATTERN, Tokenizer, build_tokenizer


def write_byte_ranks(path: Path, extra_lines: list[str] = ()) -> None:
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    path.write_text("\n".join(lines + list(extra_lines)) + "\n")


def test_round_trip_random_text(bundled: Tokenizer, random_text: Callable[[int], str]) -> None:
    for _ in range(20):
        text = random_text(200)
        ids = bundled.encode(text)
        assert bundled.decode(ids) == text
        assert all(0 <= i < bundled.vocab_size for i in ids)


def test_special_token_text_is_ordinary(bundled: Tokenizer) -> None:
    ids = bundled.encode(f"a{EOS_TOKEN}b")
    assert bundled.eos_id not in ids
    assert bundled.decode(ids) == f"a{EOS_TOKEN}b"


def test_bundled_vocabulary(bundled: Tokenizer) -> None:
    assert bundled.vocab_size == 4097
    assert bundled.eos_id == 4096
    assert bundled.decode([bundled.eos_id]) == EOS_TOKEN
    # A trained BPE compresses English prose well below one token per byte.
    text = "Return the number of items in the list, raising an error if it is empty."
    assert len(bundled.encode(text)) < len(text) / 3


def test_tiktoken_splits_text_where_our_regex_does(random_text: Callable[[int], str]) -> None:
    """The trainer splits with Python's `regex`, tiktoken with Rust's fancy-regex. Give every
    piece our regex finds its own rank: tiktoken then returns exactly those pieces only if it
    splits the text identically. Code points unassigned in this Python's Unicode tables are
    dropped: the two engines may know different Unicode versions, whose categories differ."""
    text = "".join(c for c in random_text(400) if unicodedata.category(c) != "Cn")
    pieces = [p.encode() for p in regex.findall(PRETOKENIZE_PATTERN, text)]
    ranks = {bytes([b]): b for b in range(256)}
    for piece in pieces:
        ranks.setdefault(piece, len(ranks))
    encoding = tiktoken.Encoding(
        "probe", pat_str=PRETOKENIZE_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    tokens = [encoding.decode_single_token_bytes(t) for t in encoding.encode_ordinary(text)]
    assert tokens == pieces


def test_own_ranks_file_gets_eos_after_last_rank(tmp_path: Path) -> None:
    path = tmp_path / "tiny.tiktoken"
    write_byte_ranks(path, [f"{base64.b64encode(b'ab').decode()} 256"])
    tokenizer = build_tokenizer(str(path))
    assert tokenizer.vocab_size == 258
    assert tokenizer.eos_id == 257
    assert tokenizer.encode("abab") == [256, 256]


def test_edited_ranks_file_is_reread(tmp_path: Path) -> None:
    path = tmp_path / "tiny.tiktoken"
    write_byte_ranks(path)
    assert build_tokenizer(str(path)).vocab_size == 257
    write_byte_ranks(path, [f"{base64.b64encode(b'ab').decode()} 256"])
    assert build_tokenizer(str(path)).vocab_size == 258


@pytest.mark.parametrize(
    "bad_line, line_no, reason",
    [
        ("YWI=", 257, "1 fields instead of 2"),
        ("YWI= 256 x", 257, "3 fields instead of 2"),
        ("not*base64 256", 257, "bad base64 or rank"),
        ("YWI= two", 257, "bad base64 or rank"),
        ("YWI= 300", 257, "rank 300, expected 256"),
        ("YQ== 256", 257, "token b'a' repeats rank 97"),
    ],
)
def test_malformed_line_is_named(tmp_path: Path, bad_line: str, line_no: int, reason: str) -> None:
    path = tmp_path / "bad.tiktoken"
    write_byte_ranks(path, [bad_line])
    expected = (
        rf"^model\.tokenizer_path = '{regex.escape(str(path))}': line {line_no} is "
        rf"malformed \({regex.escape(reason)}\)"
    )
    with pytest.raises(ConfigError, match=expected):
        build_tokenizer(str(path))


def test_ranks_file_without_all_bytes(tmp_path: Path) -> None:
    path = tmp_path / "short.tiktoken"
    path.write_text("YQ== 0\n")
    with pytest.raises(ConfigError, match=r"model.tokenizer_path .* 255 of the 256 single bytes"):
        build_tokenizer(str(path))


@pytest.mark.parametrize("spec", ["missing/tok.tiktoken", "foo.bpe", "not_an_encoding"])
def test_unknown_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spec: str) -> None:
    monkeypatch.chdir(tmp_path)
    expected = rf"^model\.tokenizer_path = '{regex.escape(spec)}': no such file"
    with pytest.raises(ConfigError, match=expected):
        build_tokenizer(spec)


def test_named_encoding_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str) -> tiktoken.Encoding:
        raise ConnectionError("name resolution failed")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(
        ConfigError,
        match=r"^model\.tokenizer_path = 'cl100k_base' could not be "
        r"loaded \(ConnectionError\).*'bundled'",
    ):
        build_tokenizer("cl100k_base")
