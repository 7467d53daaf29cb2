"""A released model's tokenizer: a Hugging Face ``tokenizer.json`` (Qwen3, DeepSeek, Mixtral, ...)
read through the ``tokenizers`` library, with its special tokens and chat template taken from
``tokenizer_config.json`` beside it. Only files are read; nothing in them is executed (the chat
template is kept as text for the chat data format to render in a sandbox)."""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tokenizers
import xxhash

from torchmoe.config.errors import ConfigError, first_line

_KEY = "model.tokenizer_path"
# End-of-document tokens of common families, tried when tokenizer_config.json names none.
# DeepSeek's uses full-width bars: "<\uff5cend\u2581of\u2581sentence\uff5c>".
_EOS_GUESSES = (
    "<|endoftext|>",
    "</s>",
    "<|end_of_text|>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",
    "<|im_end|>",
)


class HFTokenizer:
    """``tokenizers.Tokenizer`` plus the ids the packer needs. Special-token strings inside a
    document are encoded as ordinary text (``encode_special_tokens``), so a document that
    mentions '<|endoftext|>' cannot forge a document boundary."""

    def __init__(self, folder_or_file: Path, spec: str) -> None:
        file = folder_or_file / "tokenizer.json" if folder_or_file.is_dir() else folder_or_file
        if not file.is_file():
            hint = (
                " (it has tokenizer.model: save it as tokenizer.json with transformers' "
                "AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
                if (folder_or_file / "tokenizer.model").is_file()
                else ""
            )
            raise ConfigError(f"{_KEY} = {spec!r}: no tokenizer.json in the folder{hint}")
        raw = file.read_bytes()
        try:
            self._tok = tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises plain Exception for malformed files
            raise ConfigError(
                f"{_KEY} = {spec!r}: {file} is not a tokenizers file ({first_line(e)})"
            ) from None
        self._tok.encode_special_tokens = True
        self.config = _read_config(file.parent / "tokenizer_config.json", spec)
        # name in a tokenizer folder -> the file here (an import or export copies them)
        self.files = {"tokenizer.json": file} | {
            name: file.parent / name for name in _COMPANIONS if (file.parent / name).is_file()
        }
        vocab = self._tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eos_id = self._special("eos_token", spec, required=True, guesses=_EOS_GUESSES)
        self.bos_id = self._special("bos_token", spec)
        self.pad_id = self._special("pad_token", spec)
        template = self.config.get("chat_template")
        if template is None and (file.parent / "chat_template.jinja").is_file():
            template = (file.parent / "chat_template.jinja").read_text()
        self.chat_template: str | None = template if isinstance(template, str) else None
        # the vocabulary and the ids the packer and templates use: another EOS is another job
        specials = f"{self.eos_id},{self.bos_id},{self.pad_id}".encode()
        self.digest = "hf:" + xxhash.xxh3_64_hexdigest(raw + b"\0" + specials)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def encode_with_offsets(self, rendered: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of text a chat template rendered, where special-token strings are the special
        tokens, and each id's character span."""
        self._tok.encode_special_tokens = False
        try:
            encoding = self._tok.encode(rendered, add_special_tokens=False)
        finally:
            self._tok.encode_special_tokens = True
        return encoding.ids, encoding.offsets

    def special_tokens(self) -> list[str]:
        """The strings of the added special tokens (<|im_start|>, ...)."""
        return [t.content for t in self._tok.get_added_tokens_decoder().values() if t.special]

    def _special(
        self, name: str, spec: str, required: bool = False, guesses: Sequence[str] = ()
    ) -> int | None:
        """The id of the special token ``tokenizer_config.json`` names under ``name``."""
        value = self.config.get(name)
        if isinstance(value, dict):  # {"content": "<|endoftext|>", ...}
            value = value.get("content")
        candidates = [value] if isinstance(value, str) else list(guesses)
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        if isinstance(value, str):
            raise ConfigError(
                f"{_KEY} = {spec!r}: tokenizer_config.json names {name} {value!r}, which is "
                "not in tokenizer.json's vocabulary; fix the config"
            )
        if required:
            raise ConfigError(
                f"{_KEY} = {spec!r}: no end-of-document token: tokenizer_config.json sets no "
                f"{name} and none of {list(guesses)} is in the vocabulary; set {name} there"
            )
        return None


# Files beside tokenizer.json that belong to the tokenizer.
_COMPANIONS = (
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)


def _read_config(path: Path, spec: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"{_KEY} = {spec!r}: {path} is not valid JSON ({first_line(e)})"
        ) from None
    if not isinstance(config, dict):
        raise ConfigError(f"{_KEY} = {spec!r}: {path} must hold a JSON object")
    return config
