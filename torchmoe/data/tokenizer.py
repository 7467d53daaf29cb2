"""Text <-> token ids: tiktoken ranks files and encodings (the default vocabulary is the BPE
bundled with the repo, so training works offline), or a Hugging Face tokenizer.json
(hf_tokenizer.py). ``Tokenizer`` is what the rest of torchmoe relies on."""

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import tiktoken
import xxhash

from torchmoe.config.errors import ConfigError
from torchmoe.data.hf_tokenizer import HFTokenizer

# How text is cut into pieces before byte-pair merging; merges never cross a piece boundary.
# The BPE trainer and tiktoken (at encode time) must both use exactly this pattern, or the
# learned merges would not reproduce. It is written for the `regex` module / Rust fancy-regex.
PRETOKENIZE_PATTERN = "|".join(
    (
        r"'(?:s|t|re|ve|m|ll|d)",  # English contractions: it's, don't, we're, ...
        r" ?\p{L}+",  # a word, carrying the single space before it
        r"\p{N}{1,3}",  # digits, at most three per piece, so numbers do not bloat the vocabulary
        r" ?[^\s\p{L}\p{N}]+",  # a run of punctuation/symbols, carrying the space before it
        r"\s+(?!\S)",  # whitespace, leaving its last space to the word that follows
        r"\s+",  # whitespace before a piece that takes no leading space (a digit, a newline run)
    )
)

EOS_TOKEN = "<|endoftext|>"
BUNDLED_RANKS = Path(__file__).parent / "assets" / "stdlib_bpe_4k.tiktoken"

_KEY = "model.tokenizer_path"
_CHOICES = (
    "give a Hugging Face tokenizer folder or tokenizer.json, a tiktoken ranks file, 'bundled', "
    "or an encoding name such as cl100k_base"
)


class Tokenizer(Protocol):
    """Token ids of documents, the end-of-document id the packer puts between them, and
    ``digest``, which names the vocabulary by content (checkpoints record it: a resume with
    another vocabulary is refused). ``bos_id``/``pad_id``/``chat_template`` are None where the
    tokenizer has none."""

    digest: str
    eos_id: int
    vocab_size: int
    bos_id: int | None
    pad_id: int | None
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class TiktokenTokenizer:
    """A tiktoken encoding; its end-of-text token ends documents."""

    bos_id = pad_id = chat_template = None

    def __init__(self, encoding: tiktoken.Encoding, digest: str) -> None:
        self._encoding = encoding
        self.digest = digest

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text; special-token strings in it are encoded as ordinary text, so
        a document that mentions '<|endoftext|>' cannot forge a document boundary."""
        return self._encoding.encode_ordinary(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._encoding.decode(list(ids))

    @property
    def eos_id(self) -> int:
        return self._encoding.eot_token

    @property
    def vocab_size(self) -> int:
        """Ids in use, special tokens included: the embedding needs at least this many rows."""
        return self._encoding.n_vocab


def build_tokenizer(spec: str) -> Tokenizer:
    """The tokenizer named by ``model.tokenizer_path``: 'bundled', a Hugging Face folder or
    tokenizer.json, a ranks file, or a tiktoken encoding name."""
    if spec == "bundled":
        return _from_ranks_file(BUNDLED_RANKS, spec)
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".json"):
        return HFTokenizer(path, spec)
    if path.is_file():
        return _from_ranks_file(path, spec)
    if spec in tiktoken.list_encoding_names():
        return _from_encoding_name(spec)
    raise ConfigError(f"{_KEY} = {spec!r}: no such file or tiktoken encoding; {_CHOICES}")


def read_ranks(path: Path, spec: str) -> dict[bytes, int]:
    """Parse a tiktoken ranks file ourselves (tiktoken's loader caches by path, so an edited file
    would be ignored), checking what tiktoken assumes: dense ranks in order, all 256 bytes."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                token = _parse_line(line, len(ranks), ranks)
            except ValueError as e:
                raise ConfigError(
                    f"{_KEY} = {spec!r}: line {line_no} is malformed ({e}); each line must be "
                    "'<base64 token bytes> <rank>' with ranks 0, 1, 2, ... in order"
                ) from None
            ranks[token] = len(ranks)
    missing = sum(bytes([b]) not in ranks for b in range(256))
    if missing:
        raise ConfigError(
            f"{_KEY} = {spec!r}: {missing} of the 256 single bytes have no rank, so "
            f"some text could not be encoded; {_CHOICES}"
        )
    return ranks


def _parse_line(line: bytes, expected_rank: int, ranks: dict[bytes, int]) -> bytes:
    """The token bytes of one ranks-file line; ValueError says why the line is unusable."""
    parts = line.split()
    if len(parts) != 2:
        raise ValueError(f"{len(parts)} fields instead of 2")
    try:
        token = base64.b64decode(parts[0], validate=True)
        rank = int(parts[1])
    except ValueError:
        raise ValueError("bad base64 or rank") from None
    if not token:
        raise ValueError("empty token")
    if rank != expected_rank:
        raise ValueError(f"rank {rank}, expected {expected_rank}")
    if token in ranks:
        raise ValueError(f"token {token!r} repeats rank {ranks[token]}")
    return token


def _from_ranks_file(path: Path, spec: str) -> Tokenizer:
    ranks = read_ranks(path, spec)
    encoding = tiktoken.Encoding(
        name=path.stem,
        pat_str=PRETOKENIZE_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOS_TOKEN: len(ranks)},
    )
    return TiktokenTokenizer(encoding, "ranks:" + xxhash.xxh3_64_hexdigest(path.read_bytes()))


def _from_encoding_name(name: str) -> Tokenizer:
    try:
        encoding = tiktoken.get_encoding(name)
    except OSError as e:  # tiktoken downloads the ranks on first use; network errors are OSError
        raise ConfigError(
            f"{_KEY} = {name!r} could not be loaded ({type(e).__name__}); tiktoken downloads it "
            "once and this machine may be offline: use 'bundled' or a ranks file"
        ) from e
    return TiktokenTokenizer(encoding, f"tiktoken:{name}")
