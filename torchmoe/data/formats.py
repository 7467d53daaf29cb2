"""How a row becomes training tokens, and which of them the loss sees (``data.format``).

- ``text``: the row's text, then EOS; every token is a label.
- ``prompt_completion``: ``prompt`` then ``completion`` then EOS; only the completion and the
  EOS are labels.
- ``chat``: ``messages`` (role + content) rendered by the tokenizer's chat template; only the
  assistant turns are labels: each from where the conversation before it, rendered with the
  generation prompt, ends (after the assistant header) through the turn's content and the
  special token that closes it, located in the full rendering and tokenized once with
  character offsets. Templates that render a turn differently once later turns follow (Qwen3
  drops the thinking block of earlier turns) are handled: only the full rendering is labelled.

The template is Jinja run in a sandbox (no attribute access to Python internals, no imports).
A message that spells one of the tokenizer's special tokens is a bad row: rendered, it would
forge a turn boundary.
"""

from collections.abc import Callable
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from torchmoe.config.errors import ConfigError
from torchmoe.data.bad_rows import BadRow
from torchmoe.data.tokenizer import Tokenizer

# (token ids, which of them are labels)
Encoded = tuple[list[int], list[bool]]
FORMATS = ("text", "prompt_completion", "chat")
ROLES = ("system", "user", "assistant", "tool")


def _template_error(message: str) -> None:
    raise TemplateError(message)


class ChatRenderer:
    """A tokenizer's chat template, compiled once."""

    def __init__(self, tokenizer: Any) -> None:
        template = getattr(tokenizer, "chat_template", None)
        if not template or not hasattr(tokenizer, "encode_with_offsets"):
            raise ConfigError(
                "data.format = 'chat' needs a tokenizer with a chat template: set "
                "model.tokenizer_path to a Hugging Face tokenizer folder whose "
                "tokenizer_config.json has chat_template"
            )
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _template_error
        try:
            self._template = env.from_string(template)
        except TemplateError as e:
            raise ConfigError(f"the tokenizer's chat_template does not compile ({e})") from None
        self.tokenizer = tokenizer
        self._specials = tokenizer.special_tokens()
        self._names = {
            "bos_token": _token_text(tokenizer, tokenizer.bos_id),
            "eos_token": _token_text(tokenizer, tokenizer.eos_id),
        }

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._names
            )
        except Exception as e:  # the template's own errors, or a row it cannot handle
            raise BadRow(f"the chat template refused the conversation ({e})") from None

    def encode(self, messages: Any) -> Encoded:
        messages = self._checked(messages)
        text = self.render(messages, add_generation_prompt=False)
        spans, cursor = [], 0
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prefix = self.render(messages[:i], add_generation_prompt=True)
            start = len(prefix)
            if start < cursor or not text.startswith(prefix):
                raise BadRow("the chat template renders the turns before an answer differently")
            found = text.find(m["content"], start)
            if found < 0:
                raise BadRow("the chat template does not render an assistant turn's content")
            end = found + len(m["content"])
            closing = next((t for t in self._specials if text.startswith(t, end)), "")
            spans.append((start, end + len(closing)))
            cursor = end + len(closing)
        if not spans:
            raise BadRow("no assistant message: nothing to learn")
        ids, offsets = self.tokenizer.encode_with_offsets(text)
        labels = [any(a <= s < b for a, b in spans) for s, _ in offsets]
        return ids, labels

    def _checked(self, messages: Any) -> list[dict]:
        if not isinstance(messages, list) or not messages:
            raise BadRow("'messages' is not a non-empty list")
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise BadRow(f"a message is not {{'role': one of {list(ROLES)}, 'content': text}}")
            if not isinstance(m.get("content"), str):
                raise BadRow(f"a {m['role']} message has no text content")
            forged = next((s for s in self._specials if s in m["content"]), None)
            if forged:
                raise BadRow(f"a {m['role']} message spells the special token {forged!r}")
        return messages


def _token_text(tokenizer: Any, token_id: int | None) -> str:
    return tokenizer.decode([token_id]) if token_id is not None else ""


def build_encoder(fmt: str, tokenizer: Tokenizer, field: str) -> Callable[[Any], Encoded]:
    """Row (text, or a record) -> (ids, labels) for ``data.format`` = ``fmt``."""
    eos = tokenizer.eos_id
    if fmt == "text":
        return lambda text: (tokenizer.encode(text) + [eos], [])  # [] = every token a label
    if fmt == "prompt_completion":

        def prompt_completion(record: dict) -> Encoded:
            prompt, completion = record.get("prompt"), record.get("completion")
            if not isinstance(prompt, str) or not isinstance(completion, str):
                raise BadRow("no 'prompt' and 'completion' text")
            if not completion.strip():
                raise BadRow("empty completion")
            head, tail = tokenizer.encode(prompt), tokenizer.encode(completion) + [eos]
            return head + tail, [False] * len(head) + [True] * len(tail)

        return prompt_completion
    renderer = ChatRenderer(tokenizer)
    return lambda record: renderer.encode(record.get(field))
