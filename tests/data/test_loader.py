import json
import random
from pathlib import Path
from typing import Any

import datasets
import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import Data
from torchmoe.data.bad_rows import BadDataError, BadRowCounter
from torchmoe.data.datasets import ListTable, StreamedDocuments, open_source
from torchmoe.data.global_order import GlobalOrder
from torchmoe.data.loader import PackedLoader, build_loader, row_counts
from torchmoe.data.prefetch import Batch, Prefetcher
from torchmoe.data.tokenizer import Tokenizer


def random_docs(rng: random.Random, n: int) -> list[str]:
    words = ["def", " the", " value", "é", "中", "\n", "  ", "42", "!"]
    return [f"<{i}>" + "".join(rng.choices(words, k=rng.randint(0, 60))) for i in range(n)]


def loader(
    docs: list[Any],
    tokenizer: Tokenizer,
    seed: int,
    seq_len: int = 16,
    batch_size: int = 3,
    dp: tuple[int, int] = (0, 1),
    accumulation: int = 1,
    field: str | None = None,
    max_bad: float = 0.001,
    documents: bool = False,
) -> PackedLoader:
    return PackedLoader(
        ListTable(docs, "docs", field),
        tokenizer,
        seq_len,
        batch_size,
        dp_rank=dp[0],
        dp_world=dp[1],
        accumulation=accumulation,
        seed=seed,
        bad_rows=BadRowCounter(max_bad),
        document_ids=documents,
    )


def take(batches: Any, n: int) -> list[Batch]:
    return [next(batches) for _ in range(n)]


def assert_same(a: list[Batch], b: list[Batch]) -> None:
    assert len(a) == len(b)
    for (x1, y1, d1), (x2, y2, d2) in zip(a, b):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
        assert (d1 is None and d2 is None) or torch.equal(d1, d2)


def json_round_trip(state: dict) -> dict:
    return json.loads(json.dumps(state))


def global_batches(loaders: list[PackedLoader], accumulation: int, steps: int) -> list[Batch]:
    """Each step's rows over every rank and micro-batch, in row order."""
    out = []
    for _ in range(steps):
        parts = [next(r) for r in loaders for _ in range(accumulation)]
        out.append(
            Batch(torch.cat([b.inputs for b in parts]), torch.cat([b.labels for b in parts]))
        )
    return out


def layout(docs: list[str], tok: Tokenizer, seed: int, rows: int, dp: int, acc: int) -> list:
    local = rows // (dp * acc)
    return [
        loader(docs, tok, seed, batch_size=local, dp=(r, dp), accumulation=acc) for r in range(dp)
    ]


def test_rows_are_the_streams_of_the_global_order(rng: random.Random, bundled: Tokenizer) -> None:
    docs = random_docs(rng, 30)
    seed, seq_len, rows = rng.randrange(1000), rng.randint(4, 40), rng.randint(1, 4)
    order = GlobalOrder(len(docs), seed)
    streams = []
    for j in range(rows):  # two epochs' worth, more than the batches below use
        tokens: list[int] = []
        for k in range(2 * len(docs)):
            tokens += bundled.encode(docs[order[j + k * rows]]) + [bundled.eos_id]
        streams.append(tokens)
    n_batches = (min(map(len, streams)) - 1) // seq_len

    batches = take(loader(docs, bundled, seed, seq_len, rows), n_batches)
    for b, (inputs, labels, _) in enumerate(batches):
        assert inputs.shape == labels.shape == (rows, seq_len)
        assert inputs.dtype == labels.dtype == torch.int64
        for j in range(rows):
            assert inputs[j].tolist() == streams[j][b * seq_len : (b + 1) * seq_len]
            assert labels[j].tolist() == streams[j][b * seq_len + 1 : (b + 1) * seq_len + 1]


def test_global_batches_are_the_same_at_every_layout(
    rng: random.Random, bundled: Tokenizer
) -> None:
    docs, seed = random_docs(rng, 25), rng.randrange(1000)
    reference = global_batches(layout(docs, bundled, seed, 4, 1, 1), 1, 12)
    for dp, acc in [(1, 2), (1, 4), (2, 1), (2, 2), (4, 1)]:
        assert_same(global_batches(layout(docs, bundled, seed, 4, dp, acc), acc, 12), reference)


def test_other_seed_other_order(rng: random.Random, bundled: Tokenizer) -> None:
    docs = random_docs(rng, 20)
    seed = rng.randrange(1000)
    first = take(loader(docs, bundled, seed), 5)
    assert_same(first, take(loader(docs, bundled, seed), 5))
    other = take(loader(docs, bundled, seed + 1), 5)
    assert not all(torch.equal(x1, x2) for (x1, *_), (x2, *_) in zip(first, other))


@pytest.mark.parametrize("k", [0, 1, 3, 8, 13, 40])
def test_resume_yields_the_uninterrupted_batches(
    rng: random.Random, bundled: Tokenizer, k: int
) -> None:
    docs, seed = random_docs(rng, 12), rng.randrange(1000)
    uninterrupted = loader(docs, bundled, seed, documents=True)
    take(uninterrupted, k)
    state = json_round_trip(uninterrupted.state_dict())
    resumed = loader(docs, bundled, seed, documents=True)
    resumed.load_state_dict(state)
    # 30 batches cross an epoch end; the document ids of the unread tokens are restored too
    assert_same(take(resumed, 30), take(uninterrupted, 30))


def test_a_document_starts_after_each_eos(rng: random.Random, bundled: Tokenizer) -> None:
    """Document ids (block-causal attention) step up by one exactly where the previous input
    is the EOS that ends a document, and nowhere else."""
    docs, seed = random_docs(rng, 12), rng.randrange(1000)
    steps = 0
    for inputs, _, documents in take(loader(docs, bundled, seed, documents=True), 20):
        after_eos = (inputs[:, :-1] == bundled.eos_id).int()
        assert torch.equal(documents.diff(dim=1), after_eos)
        steps += int(after_eos.sum())
    assert steps >= 5  # documents end inside rows
    assert next(loader(docs, bundled, seed)).document_ids is None  # only when asked for


@pytest.mark.parametrize("new_dp", [1, 2])
def test_resume_at_another_data_parallel_size(
    rng: random.Random, bundled: Tokenizer, new_dp: int
) -> None:
    """A checkpoint gathers every rank's streams; a rank of any layout takes its own."""
    docs, seed = random_docs(rng, 20), rng.randrange(1000)
    before = layout(docs, bundled, seed, 4, 4, 1)
    global_batches(before, 1, rng.randint(1, 9))
    saved: dict[str, Any] = {}
    for rank in before:
        saved |= json_round_trip(rank.state_dict())
    acc = 4 // new_dp
    after = layout(docs, bundled, seed, 4, new_dp, acc)
    for rank in after:
        rank.load_state_dict({k: saved[k] for k in rank.state_dict()})
    assert_same(global_batches(after, acc, 10), global_batches(before, 1, 10))


def test_resume_with_another_seed_or_global_batch_is_an_error(
    rng: random.Random, bundled: Tokenizer
) -> None:
    docs = random_docs(rng, 10)
    state = loader(docs, bundled, seed=1).state_dict()
    with pytest.raises(ConfigError, match=r"resume with the same training.seed, global batch"):
        loader(docs, bundled, seed=2).load_state_dict(state)
    with pytest.raises(ConfigError, match=r"'rows_per_batch': 3.*'rows_per_batch': 6"):
        loader(docs, bundled, seed=1, batch_size=3, accumulation=2).load_state_dict(state)


def test_state_is_plain_python(rng: random.Random, bundled: Tokenizer) -> None:
    batches = loader(random_docs(rng, 5), bundled, seed=0)
    take(batches, 2)
    state = batches.state_dict()
    assert json_round_trip(state) == state and state["stream_0"]["tokens"]


def records_with_bad_rows(rng: random.Random, n: int, bad_every: int) -> list[Any]:
    """JSON-like records where every bad_every-th one has no usable text, of varied kinds."""
    bad = [{"text": None}, {"text": 3}, {"body": "x"}, {"text": " "}, "not a record"]
    docs = random_docs(rng, n)
    return [rng.choice(bad) if i % bad_every == 0 else {"text": d} for i, d in enumerate(docs)]


def test_bad_rows_are_skipped_counted_and_resumed_exactly(
    rng: random.Random, bundled: Tokenizer
) -> None:
    records = records_with_bad_rows(rng, 40, bad_every=7)  # 6 bad of 40
    seed = rng.randrange(1000)

    def make() -> PackedLoader:
        return loader(records, bundled, seed, field="text", max_bad=0.01)  # 10 allowed

    uninterrupted = make()
    batches = take(uninterrupted, 12)
    # the shuffled order may put every bad record late: read on until one has been met
    while row_counts(uninterrupted.state_dict())[1] == 0 and len(batches) < 200:
        batches += take(uninterrupted, 1)
    tokens = {t for x, *_ in batches for t in x.flatten().tolist()}
    assert bundled.eos_id in tokens  # documents were read and packed
    rows, bad = row_counts(uninterrupted.state_dict())
    assert 0 < bad < rows and bad == sum(uninterrupted.bad_rows.by_file.values())
    state = json_round_trip(uninterrupted.state_dict())
    resumed = make()
    resumed.load_state_dict(state)
    assert_same(take(resumed, 10), take(uninterrupted, 10))
    assert row_counts(resumed.state_dict()) == row_counts(uninterrupted.state_dict())


def test_too_many_bad_rows_stop_with_one_line(rng: random.Random, bundled: Tokenizer) -> None:
    records = records_with_bad_rows(rng, 30, bad_every=2)  # half bad: more than 1 in 1000
    with pytest.raises(
        BadDataError,
        match=r"^data: 11 of \d+ rows read are bad, more than data.max_bad_fraction = 0.001 "
        r"allows \(last: docs row \d+: .*\); fix or drop",
    ):
        take(loader(records, bundled, seed=0, field="text"), 20)


def test_a_fraction_of_zero_stops_at_the_first_bad_row(
    rng: random.Random, bundled: Tokenizer
) -> None:
    records = [{"text": f"doc {i} word"} for i in range(30)]
    records[rng.randrange(30)] = {"text": None}
    with pytest.raises(BadDataError, match=r"^data: 1 of \d+ rows read are bad"):
        take(loader(records, bundled, seed=0, field="text", max_bad=0.0), 200)


def test_a_corpus_within_the_limit_never_stops_a_rank(
    rng: random.Random, bundled: Tokenizer
) -> None:
    """Each rank judges its own sample: chance alone must not end the run (0.05% bad, half
    the 0.1% allowed, over 8 ranks' samples)."""
    records = [{"text": f"doc {i} " + "word " * rng.randint(1, 20)} for i in range(20000)]
    for i in rng.sample(range(20000), 10):
        records[i] = {"text": None}
    for rank in range(8):
        batches = loader(records, bundled, seed=rng.randrange(1000), dp=(rank, 8), field="text")
        take(batches, 1000)  # about 2500 rows per rank
        assert row_counts(batches.state_dict())[0] > 2000


def test_prefetched_batches_and_positions_equal_the_plain_loader(
    rng: random.Random, bundled: Tokenizer
) -> None:
    docs, seed = random_docs(rng, 15), rng.randrange(1000)
    plain = loader(docs, bundled, seed)
    ahead = Prefetcher(loader(docs, bundled, seed), depth=3)
    for _ in range(8):
        assert_same([next(ahead)], [next(plain)])
        assert ahead.state_dict() == plain.state_dict()  # after the batch taken, not those made
    resumed = Prefetcher(loader(docs, bundled, seed), depth=2)
    take(resumed, 3)  # its thread is ahead of this position: loading drops those batches
    resumed.load_state_dict(json_round_trip(ahead.state_dict()))
    assert_same(take(resumed, 10), take(plain, 10))
    reference = loader(docs, bundled, seed)
    reference.load_state_dict(ahead.state_dict())
    ahead.close()  # a closed prefetcher goes on where the batches taken end, none skipped
    assert_same(take(ahead, 5), take(reference, 5))
    for p in (ahead, resumed):
        p.close()


def test_a_loader_error_reaches_the_trainer_at_its_batch(
    rng: random.Random, bundled: Tokenizer
) -> None:
    records = [{"text": d} for d in random_docs(rng, 8)] + [{"text": 1}] * 8
    plain = loader(records, bundled, seed=0, field="text", batch_size=1)
    good = 0
    with pytest.raises(BadDataError):
        while True:
            next(plain)
            good += 1
    ahead = Prefetcher(loader(records, bundled, seed=0, field="text", batch_size=1), depth=4)
    take(ahead, good)
    with pytest.raises(BadDataError):
        next(ahead)


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
        return PackedLoader(StreamedDocuments(ds, "s", ["text"], 0, 1), bundled, 8, 2)

    uninterrupted = streamed_loader()
    take(uninterrupted, rng.randint(1, 10))
    resumed = streamed_loader()
    resumed.load_state_dict(json_round_trip(uninterrupted.state_dict()))
    assert_same(take(resumed, 20), take(uninterrupted, 20))


def test_build_loader_on_stdlib_docs(
    stdlib_docs: list[str], stdlib_cache: Path, bundled: Tokenizer
) -> None:
    cfg = Data(cache_dir=str(stdlib_cache))
    docs = open_source(cfg, 0, 2)
    ranks = [build_loader(docs, cfg, bundled, 64, 2, rank, 2, seed=5) for rank in range(2)]
    (x0, y0, _), (x1, *_) = next(ranks[0]), next(ranks[1])
    assert x0.shape == (2, 64) and torch.equal(y0[:, :-1], x0[:, 1:])
    assert not torch.equal(x0, x1)
    tokens = x0[0].tolist()  # row 0 starts with the first document of its stream
    first = tokens[: tokens.index(bundled.eos_id)] if bundled.eos_id in tokens else tokens
    assert any(bundled.encode(doc)[: len(first)] == first for doc in stdlib_docs)
    for rank in ranks:
        rank.close()
