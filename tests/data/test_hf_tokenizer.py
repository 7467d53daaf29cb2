"""Hugging Face tokenizer.json folders load through `tokenizers`, agree with transformers, and
every unusable folder is one line."""

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import tokenizers
from transformers import AutoTokenizer

from tests.tokenizer_files import CONFIG, train_tokenizer
from torchmoe.config.errors import ConfigError
from torchmoe.data.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, stdlib_docs: list[str]) -> Path:
    return train_tokenizer(stdlib_docs[:300], tmp_path_factory.mktemp("tok") / "tok", CONFIG)


def test_ids_equal_transformers_and_round_trip(
    hf_folder: Path, random_text: Callable[[int], str], rng: random.Random
) -> None:
    ours = build_tokenizer(str(hf_folder))
    reference = AutoTokenizer.from_pretrained(str(hf_folder), split_special_tokens=True)
    for _ in range(30):
        text = random_text(rng.randint(1, 60))
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text


def test_special_tokens_and_template_come_from_the_config(hf_folder: Path) -> None:
    tok = build_tokenizer(str(hf_folder / "tokenizer.json"))  # the file itself works too
    raw = tokenizers.Tokenizer.from_file(str(hf_folder / "tokenizer.json"))
    assert tok.eos_id == tok.pad_id == raw.token_to_id("<|endoftext|>")
    assert tok.bos_id is None and tok.chat_template == CONFIG["chat_template"]
    assert tok.vocab_size == raw.get_vocab_size(with_added_tokens=True)
    # a document cannot forge a boundary by spelling the EOS token
    assert tok.eos_id not in tok.encode("a <|endoftext|> b")


def test_digest_names_the_vocabulary(hf_folder: Path, tmp_path: Path, stdlib_docs) -> None:
    other = train_tokenizer(stdlib_docs[300:500], tmp_path / "other", CONFIG)
    assert build_tokenizer(str(hf_folder)).digest == build_tokenizer(str(hf_folder)).digest
    assert build_tokenizer(str(hf_folder)).digest != build_tokenizer(str(other)).digest
    # the same vocabulary with another end-of-document token is another tokenizer
    again = tmp_path / "again"
    again.mkdir()
    (again / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    (again / "tokenizer_config.json").write_text(json.dumps({**CONFIG, "eos_token": "<|im_end|>"}))
    assert build_tokenizer(str(again)).digest != build_tokenizer(str(hf_folder)).digest


def test_eos_guessed_without_a_config(tmp_path: Path, stdlib_docs) -> None:
    folder = train_tokenizer(stdlib_docs[:100], tmp_path / "bare", None)
    tok = build_tokenizer(str(folder))
    assert tok.decode([tok.eos_id]) == "<|endoftext|>" and tok.chat_template is None


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda f: None, r"no tokenizer\.json in the folder$"),
        (
            lambda f: (f / "tokenizer.model").write_bytes(b"\x00"),
            r"no tokenizer\.json in the folder \(it has tokenizer\.model: save it as",
        ),
        (
            lambda f: (f / "tokenizer.json").write_text('{"version": "1.0", "model": 3}'),
            r".*/tokenizer\.json is not a tokenizers file \(",
        ),
    ],
)
def test_unusable_folders_are_one_line(tmp_path: Path, make, message: str) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    make(folder)
    with pytest.raises(ConfigError, match=r"^model\.tokenizer_path = '.*': " + message) as err:
        build_tokenizer(str(folder))
    assert "\n" not in str(err.value)


def test_config_problems_are_one_line(hf_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((hf_folder / "tokenizer.json").read_bytes())
    # older configs write a token as an object with its content
    (folder / "tokenizer_config.json").write_text('{"eos_token": {"content": "<|im_end|>"}}')
    assert (
        build_tokenizer(str(folder)).decode([build_tokenizer(str(folder)).eos_id]) == "<|im_end|>"
    )
    (folder / "tokenizer_config.json").write_text('{"eos_token": "<|nope|>"}')
    with pytest.raises(ConfigError, match=r"names eos_token '<\|nope\|>', which is not in"):
        build_tokenizer(str(folder))
    (folder / "tokenizer_config.json").write_text("{broken")
    with pytest.raises(ConfigError, match=r"tokenizer_config\.json is not valid JSON"):
        build_tokenizer(str(folder))
