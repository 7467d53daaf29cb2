import json
import pickle
import random
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import Data
from torchmoe.data.datasets import (
    DocumentStream,
    ShuffledDocuments,
    StreamedDocuments,
    open_documents,
)


def unique_docs(rng: random.Random, n: int) -> list[str]:
    return [
        f"doc{i} " + " ".join(rng.choices(["alpha", "beta", "gamma", "δ", "🙂"], k=5))
        for i in range(n)
    ]


def take(stream: DocumentStream, n: int) -> list[str]:
    return [next(stream) for _ in range(n)]


def write_docs(path: Path, docs: list[str], field: str = "text") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    records = [{field: doc, "id": i} for i, doc in enumerate(docs)]
    if path.suffix == ".txt":
        path.write_text("\n".join(docs) + "\n")
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif path.suffix == ".json":
        path.write_text(json.dumps(records))
    else:
        pq.write_table(pa.Table.from_pylist(records), path)


def local_cfg(path: Path | str, tmp_path: Path, **kw: str) -> Data:
    return Data(dataset=str(path), cache_dir=str(tmp_path / "cache"), **kw)


def stream_json(path: Path) -> datasets.IterableDataset:
    return datasets.load_dataset(
        "json",
        data_files=str(path),
        split="train",
        streaming=True,
        cache_dir=str(path.parent / "hf_cache"),
    )


def streamed(path: Path, rank: int, world: int) -> StreamedDocuments:
    return StreamedDocuments(stream_json(path), str(path), "text", rank, world)


def test_ranks_get_disjoint_shards_covering_each_epoch(rng: random.Random) -> None:
    docs = unique_docs(rng, rng.randint(50, 80))
    world, seed = 3, rng.randrange(1000)
    ranks = [ShuffledDocuments(docs, "x", r, world, seed) for r in range(world)]
    for _ in range(2):  # two epochs
        seen = [take(ranks[r], len(docs[r::world])) for r in range(world)]
        assert sorted(d for part in seen for d in part) == sorted(docs)


def test_order_is_seeded_and_reshuffled_per_epoch(rng: random.Random) -> None:
    docs = unique_docs(rng, 40)
    seed = rng.randrange(1000)
    first = take(ShuffledDocuments(docs, "x", 0, 1, seed), 80)
    assert first == take(ShuffledDocuments(docs, "x", 0, 1, seed), 80)
    assert first != take(ShuffledDocuments(docs, "x", 0, 1, seed + 1), 80)
    assert first[:40] != first[40:] and sorted(first[:40]) == sorted(first[40:]) == sorted(docs)


@pytest.mark.parametrize("consumed", [0, 7, 19, 20, 21, 45])
def test_shuffled_resume_is_exact_across_epochs(rng: random.Random, consumed: int) -> None:
    docs = unique_docs(rng, 40)
    stream = ShuffledDocuments(docs, "x", 1, 2, rng.randrange(1000))  # 20 documents per epoch
    take(stream, consumed)
    state = pickle.loads(pickle.dumps(stream.state_dict()))
    resumed = ShuffledDocuments(docs, "x", 1, 2, stream.state_dict()["seed"])
    resumed.load_state_dict(state)
    assert take(resumed, 50) == take(stream, 50)


def test_resume_with_another_seed_is_an_error(rng: random.Random) -> None:
    docs = unique_docs(rng, 10)
    state = ShuffledDocuments(docs, "x", 0, 1, seed=1).state_dict()
    with pytest.raises(ConfigError, match=r"resume with the same training.seed"):
        ShuffledDocuments(docs, "x", 0, 1, seed=2).load_state_dict(state)


def test_stdlib_docs_source(stdlib_docs: list[str], stdlib_cache: Path) -> None:
    cfg = Data(cache_dir=str(stdlib_cache))
    rank0, rank1 = (take(open_documents(cfg, r, 2, seed=0), 30) for r in range(2))
    assert not set(rank0) & set(rank1)
    assert set(rank0 + rank1) <= set(stdlib_docs)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet"])
def test_local_file_loads_through_datasets(rng: random.Random, tmp_path: Path, suffix: str) -> None:
    docs = unique_docs(rng, 25)
    write_docs(tmp_path / f"corpus{suffix}", docs)
    stream = open_documents(local_cfg(tmp_path / f"corpus{suffix}", tmp_path), 0, 1, seed=3)
    assert sorted(take(stream, 25)) == sorted(docs)


def test_local_folder_reads_every_data_file(rng: random.Random, tmp_path: Path) -> None:
    docs = unique_docs(rng, 30)
    write_docs(tmp_path / "data" / "a.jsonl", docs[:10])
    write_docs(tmp_path / "data" / "sub" / "b.jsonl", docs[10:])
    (tmp_path / "data" / "README.md").write_text("not data")
    stream = open_documents(local_cfg(tmp_path / "data", tmp_path), 0, 1, seed=0)
    assert sorted(take(stream, 30)) == sorted(docs)


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.dataset = '.*nope\.jsonl': no such file"):
        open_documents(local_cfg(tmp_path / "nope.jsonl", tmp_path), 0, 1, seed=0)


def test_unknown_file_type(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(ConfigError, match=r"^data\.dataset = '.*d\.csv': unknown file type"):
        open_documents(local_cfg(tmp_path / "d.csv", tmp_path), 0, 1, seed=0)


def test_folder_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("text")
    with pytest.raises(ConfigError, match=r"^data\.dataset = '.*empty': the folder has no data"):
        open_documents(local_cfg(tmp_path / "empty", tmp_path), 0, 1, seed=0)


def test_relative_missing_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.dataset = './corpus': no such file or folder"):
        open_documents(local_cfg("./corpus", tmp_path), 0, 1, seed=0)


def test_folder_of_mixed_kinds(rng: random.Random, tmp_path: Path) -> None:
    write_docs(tmp_path / "d" / "a.txt", unique_docs(rng, 3))
    write_docs(tmp_path / "d" / "b.jsonl", unique_docs(rng, 3))
    with pytest.raises(ConfigError, match=r"has mixed \(json, text\) data files"):
        open_documents(local_cfg(tmp_path / "d", tmp_path), 0, 1, seed=0)


def test_missing_text_field(rng: random.Random, tmp_path: Path) -> None:
    write_docs(tmp_path / "c.jsonl", unique_docs(rng, 5), field="body")
    cfg = local_cfg(tmp_path / "c.jsonl", tmp_path, text_field="text")
    with pytest.raises(
        ConfigError,
        match=r"^data\.text_field = 'text': .* has no such column; "
        r"choose one of \['body', 'id'\]",
    ):
        open_documents(cfg, 0, 1, seed=0)


def test_unparsable_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(ConfigError, match=r"^data\.dataset = '.*bad\.jsonl' could not be read"):
        open_documents(local_cfg(tmp_path / "bad.jsonl", tmp_path), 0, 1, seed=0)


def test_too_few_documents_for_the_ranks(rng: random.Random, tmp_path: Path) -> None:
    write_docs(tmp_path / "one.jsonl", unique_docs(rng, 1))
    with pytest.raises(ConfigError, match=r"1 documents cannot feed 2 data-parallel ranks"):
        open_documents(local_cfg(tmp_path / "one.jsonl", tmp_path), 0, 2, seed=0)


def test_hub_dataset_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ConfigError,
        match=r"^data\.dataset = 'c4' could not be loaded \(.*allenai/"
        r"c4.*\); this machine may be offline: use the default "
        r"'stdlib_docs' or a local file$",
    ):
        open_documents(local_cfg("c4", tmp_path), 0, 1, seed=0)


def test_streamed_ranks_are_disjoint(rng: random.Random, tmp_path: Path) -> None:
    docs = unique_docs(rng, 30)
    write_docs(tmp_path / "s.jsonl", docs)
    seen = [take(streamed(tmp_path / "s.jsonl", r, 2), 15) for r in range(2)]
    assert sorted(seen[0] + seen[1]) == sorted(docs)


@pytest.mark.parametrize("consumed", [0, 4, 11, 12, 13, 30])
def test_streamed_resume_is_exact_across_epochs(
    rng: random.Random, tmp_path: Path, consumed: int
) -> None:
    docs = unique_docs(rng, 24)
    write_docs(tmp_path / "s.jsonl", docs)
    stream = streamed(tmp_path / "s.jsonl", 1, 2)  # 12 documents per epoch
    take(stream, consumed)
    state = pickle.loads(pickle.dumps(stream.state_dict()))
    resumed = streamed(tmp_path / "s.jsonl", 1, 2)
    resumed.load_state_dict(state)
    expected = take(stream, 30)
    assert take(resumed, 30) == expected
    assert sorted(expected[:12]) == sorted(docs[1::2])


def test_streamed_missing_text_field(rng: random.Random, tmp_path: Path) -> None:
    """Caught when the stream is opened if its columns are known (newer datasets), else at the
    first row; never a KeyError."""
    write_docs(tmp_path / "s.jsonl", unique_docs(rng, 4), field="body")
    ds = stream_json(tmp_path / "s.jsonl")
    for source in (ds, ds.map(lambda row: row)):  # after map, columns are unknown until read
        with pytest.raises(ConfigError, match=r"^data\.text_field = 'text'.*\['body', 'id'\]"):
            next(StreamedDocuments(source, "s", "text", 0, 1))
