"""data.format: chat rows rendered by the tokenizer's template with labels on assistant turns
only (checked against transformers' rendering), prompt/completion with labels on the completion,
and the loader's packed labels masked where they should be, resumable exactly."""

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from tests.tokenizer_files import CHAT_CONFIG as CONFIG
from tests.tokenizer_files import train_tokenizer
from torchmoe.config.errors import ConfigError
from torchmoe.data.bad_rows import BadRow
from torchmoe.data.datasets import ListTable
from torchmoe.data.formats import build_encoder
from torchmoe.data.loader import IGNORE, PackedLoader
from torchmoe.data.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def chat_folder(tmp_path_factory, stdlib_docs) -> Path:
    return train_tokenizer(stdlib_docs[:300], tmp_path_factory.mktemp("chat") / "tok", CONFIG)


def conversation(rng: random.Random) -> list[dict]:
    words = ["route", "the", "tokens", "experts", "why", "é", "中", "42"]
    say = lambda: " ".join(rng.choices(words, k=rng.randint(1, 8)))  # noqa: E731
    turns = [{"role": "system", "content": say()}] if rng.random() < 0.5 else []
    for _ in range(rng.randint(1, 3)):
        turns += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
    return turns


def test_chat_ids_equal_transformers_and_labels_are_the_assistant_turns(chat_folder, rng):
    tok = build_tokenizer(str(chat_folder))
    encode = build_encoder("chat", tok, "messages")
    reference = AutoTokenizer.from_pretrained(str(chat_folder))
    for _ in range(10):
        messages = conversation(rng)
        ids, labels = encode({"messages": messages})
        assert ids == reference.apply_chat_template(messages, tokenize=True, return_dict=False)
        learned = tok.decode([i for i, label in zip(ids, labels) if label])
        expected = "".join(
            m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"
        )
        assert learned == expected


# Qwen3's way: the thinking block stays only on the answer after the last user turn
THINKING = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.role == 'assistant' and loop.last %}<think>\n\n</think>\n\n{% endif %}"
    "{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_changes_earlier_turns_labels_only_the_answers(tmp_path, stdlib_docs):
    folder = train_tokenizer(
        stdlib_docs[:100], tmp_path / "t", {"eos_token": "<|endoftext|>", "chat_template": THINKING}
    )
    tok = build_tokenizer(str(folder))
    messages = [
        {"role": "user", "content": "why"},
        {"role": "assistant", "content": "route tokens"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "load balance"},
    ]
    ids, labels = build_encoder("chat", tok, "messages")({"messages": messages})
    learned = tok.decode([i for i, label in zip(ids, labels) if label])
    assert learned == "route tokens<|im_end|><think>\n\n</think>\n\nload balance<|im_end|>"


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ([{"role": "assistant", "content": "a <|im_end|> b"}], "spells the special token"),
        ([{"role": "robot", "content": "x"}], "a message is not"),
        ([{"role": "assistant", "content": 3}], "has no text content"),
        ("not a list", "is not a non-empty list"),
    ],
)
def test_unusable_conversations_are_bad_rows(chat_folder, messages, reason):
    encode = build_encoder("chat", build_tokenizer(str(chat_folder)), "messages")
    with pytest.raises(BadRow, match=reason):
        encode({"messages": messages})


def test_chat_needs_a_tokenizer_with_a_template(bundled):
    with pytest.raises(ConfigError, match=r"^data.format = 'chat' needs a tokenizer with a chat"):
        build_encoder("chat", bundled, "messages")


def test_prompt_completion_labels_the_completion_and_eos(bundled):
    encode = build_encoder("prompt_completion", bundled, "messages")
    ids, labels = encode({"prompt": "Question: why?", "completion": " Because."})
    prompt = bundled.encode("Question: why?")
    assert ids == prompt + bundled.encode(" Because.") + [bundled.eos_id]
    assert labels == [False] * len(prompt) + [True] * (len(ids) - len(prompt))
    with pytest.raises(BadRow, match="no 'prompt' and 'completion' text"):
        encode({"prompt": "x"})


def loader(records, tok, seed) -> PackedLoader:
    return PackedLoader(ListTable(records, "r"), tok, 24, 3, seed=seed, data_format="chat")


def test_packed_labels_are_masked_and_resume_exactly(chat_folder, rng):
    tok = build_tokenizer(str(chat_folder))
    records = [{"messages": conversation(rng)} for _ in range(30)]
    seed = rng.randrange(1000)
    batches = loader(records, tok, seed)
    labels = torch.cat([next(batches)[1] for _ in range(4)])
    assert (labels == IGNORE).any() and (labels != IGNORE).any()
    state = json.loads(json.dumps(batches.state_dict()))
    resumed = loader(records, tok, seed)
    resumed.load_state_dict(state)
    for _ in range(8):
        (x1, y1, _), (x2, y2, _) = next(batches), next(resumed)
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_the_labels_are_the_next_tokens_where_kept(chat_folder, rng):
    """Unmasked, the labels are the inputs shifted by one (the packing is unchanged)."""
    tok = build_tokenizer(str(chat_folder))
    records = [{"messages": conversation(rng)} for _ in range(10)]
    batches = loader(records, tok, seed=0)
    for _ in range(3):
        inputs, labels, _ = next(batches)
        kept = labels[:, :-1] != IGNORE
        assert torch.equal(labels[:, :-1][kept], inputs[:, 1:][kept])
