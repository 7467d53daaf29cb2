import json
import pickle
import random
from pathlib import Path

import datasets
import pytest
import torch

from torchmoe.config.schema import Data
from torchmoe.data.datasets import ShuffledDocuments, StreamedDocuments
from torchmoe.data.loader import PackedLoader, build_dataloader
from torchmoe.data.tokenizer import Tokenizer


def random_docs(rng: random.Random, n: int) -> list[str]:
    words = ["def", " the", " value", "é", "中", "\n", "  ", "42", "!"]
    return [f"<{i}>" + "".join(rng.choices(words, k=rng.randint(0, 60))) for i in range(n)]


def loader(
    docs: list[str], tokenizer: Tokenizer, seed: int, seq_len: int = 16, batch_size: int = 3
) -> PackedLoader:
    return PackedLoader(ShuffledDocuments(docs, "x", 0, 1, seed), tokenizer, seq_len, batch_size)


def take(batches: PackedLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [next(batches) for _ in range(n)]


def assert_same(
    a: list[tuple[torch.Tensor, torch.Tensor]], b: list[tuple[torch.Tensor, torch.Tensor]]
) -> None:
    assert len(a) == len(b)
    for (x1, y1), (x2, y2) in zip(a, b):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_batches_are_the_document_stream_shifted(rng: random.Random, bundled: Tokenizer) -> None:
    docs = random_docs(rng, 30)
    seed, seq_len, batch_size = rng.randrange(1000), rng.randint(4, 40), rng.randint(1, 4)
    source = ShuffledDocuments(docs, "x", 0, 1, seed)
    stream: list[int] = []
    for _ in range(2 * len(docs)):  # two epochs, more than the batches below use
        stream += bundled.encode(next(source)) + [bundled.eos_id]
    n_batches = (len(stream) - 1) // (seq_len * batch_size)

    batches = take(loader(docs, bundled, seed, seq_len, batch_size), n_batches)
    for inputs, labels in batches:
        assert inputs.shape == labels.shape == (batch_size, seq_len)
        assert inputs.dtype == labels.dtype == torch.int64
    inputs = torch.cat([x.flatten() for x, _ in batches]).tolist()
    labels = torch.cat([y.flatten() for _, y in batches]).tolist()
    assert inputs == stream[: len(inputs)]
    assert labels == stream[1 : len(inputs) + 1]


def test_same_seed_same_batches_other_seed_other_order(
    rng: random.Random, bundled: Tokenizer
) -> None:
    docs = random_docs(rng, 20)
    seed = rng.randrange(1000)
    first = take(loader(docs, bundled, seed), 5)
    assert_same(first, take(loader(docs, bundled, seed), 5))
    other = take(loader(docs, bundled, seed + 1), 5)
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(first, other))


@pytest.mark.parametrize("k", [0, 1, 3, 8, 13])
def test_resume_yields_the_uninterrupted_batches(
    rng: random.Random, bundled: Tokenizer, k: int
) -> None:
    docs = random_docs(rng, 12)
    seed = rng.randrange(1000)
    uninterrupted = loader(docs, bundled, seed)
    take(uninterrupted, k)
    state = pickle.loads(pickle.dumps(uninterrupted.state_dict()))
    resumed = loader(docs, bundled, seed)
    resumed.load_state_dict(state)
    expected = take(uninterrupted, 12)
    while uninterrupted.state_dict()["documents"]["epoch"] == state["documents"]["epoch"]:
        expected.append(next(uninterrupted))  # make sure the comparison crosses an epoch end
    assert_same(take(resumed, len(expected)), expected)


def test_state_is_plain_python(rng: random.Random, bundled: Tokenizer) -> None:
    batches = loader(random_docs(rng, 5), bundled, seed=0)
    take(batches, 2)

    def plain(value: object) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, list):
            return all(plain(v) for v in value)
        return isinstance(value, (int, str, float, bool, type(None)))

    state = batches.state_dict()
    assert plain(state) and state["tokens"]


def test_resume_of_a_streamed_dataset(
    rng: random.Random, bundled: Tokenizer, tmp_path: Path
) -> None:
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in random_docs(rng, 10)))

    def streamed_loader() -> PackedLoader:
        ds = datasets.load_dataset(
            "json",
            data_files=str(path),
            split="train",
            streaming=True,
            cache_dir=str(tmp_path / "hf_cache"),
        )
        return PackedLoader(StreamedDocuments(ds, "s", "text", 0, 1), bundled, 8, 2)

    uninterrupted = streamed_loader()
    take(uninterrupted, rng.randint(1, 10))
    resumed = streamed_loader()
    resumed.load_state_dict(pickle.loads(pickle.dumps(uninterrupted.state_dict())))
    assert_same(take(resumed, 20), take(uninterrupted, 20))


def test_build_dataloader_on_stdlib_docs(
    stdlib_docs: list[str], stdlib_cache: Path, bundled: Tokenizer
) -> None:
    cfg = Data(cache_dir=str(stdlib_cache))
    ranks = [build_dataloader(cfg, bundled, 64, 2, rank, 2, seed=5) for rank in range(2)]
    (x0, y0), (x1, _) = next(ranks[0]), next(ranks[1])
    assert x0.shape == (2, 64) and torch.equal(y0[:, :-1], x0[:, 1:])
    assert not torch.equal(x0, x1)
    tokens = x0.flatten().tolist()
    first = tokens[: tokens.index(bundled.eos_id)] if bundled.eos_id in tokens else tokens
    assert any(bundled.encode(doc)[: len(first)] == first for doc in stdlib_docs)
