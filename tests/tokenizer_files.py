"""A Hugging Face tokenizer folder made by `tokenizers` itself (a byte-level BPE trained on the
given text), for tests of released-model tokenizers."""

import json
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer(docs: list[str], folder: Path, config: dict | None) -> Path:
    """A byte-level BPE trained by `tokenizers` on the docs, saved as a HF folder."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(docs, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


CONFIG = {
    "eos_token": "<|endoftext|>",
    "pad_token": "<|endoftext|>",
    "bos_token": None,
    "chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}",
    "tokenizer_class": "PreTrainedTokenizerFast",
}

# A ChatML template, as Qwen's tokenizer_config.json carries one.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT_CONFIG = {"eos_token": "<|endoftext|>", "chat_template": CHATML}
