import json
import random
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import Data
from torchmoe.data.bad_rows import BadRow
from torchmoe.data.datasets import DocumentTable, StreamedDocuments, open_source


def unique_docs(rng: random.Random, n: int) -> list[str]:
    return [
        f"doc{i} " + " ".join(rng.choices(["alpha", "beta", "gamma", "δ", "🙂"], k=5))
        for i in range(n)
    ]


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


def open_table(path: Path | str, tmp_path: Path, **kw: str) -> DocumentTable:
    source = open_source(local_cfg(path, tmp_path, **kw), 0, 1)
    assert not isinstance(source, StreamedDocuments)
    return source


def texts(table: DocumentTable) -> list[str]:
    return [table.text(i) for i in range(len(table))]


def where(table: DocumentTable, index: int) -> tuple[str, int]:
    return table.file_of(index), table.line_of(index)


def reasons(table: DocumentTable) -> dict[tuple[str, int], str]:
    """Where each bad row is, and why."""
    out = {}
    for i in range(len(table)):
        try:
            table.text(i)
        except BadRow as e:
            out[where(table, i)] = f"{type(e).__name__}: {e}"
    return out


def stream_json(path: Path) -> datasets.IterableDataset:
    return datasets.load_dataset(
        "json",
        data_files=str(path),
        split="train",
        streaming=True,
        cache_dir=str(path.parent / "hf_cache"),
    )


def streamed(path: Path, rank: int, world: int) -> StreamedDocuments:
    return StreamedDocuments(stream_json(path), str(path), ["text"], rank, world)


def take(stream: StreamedDocuments, n: int) -> list[str]:
    return [stream.next_text() for _ in range(n)]


def test_stdlib_docs_source(stdlib_docs: list[str], stdlib_cache: Path) -> None:
    table = open_source(Data(cache_dir=str(stdlib_cache)), 0, 1)
    assert len(table) == len(stdlib_docs) and table.text(3) == stdlib_docs[3]
    assert where(table, 3) == ("stdlib_docs", 4)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json", ".parquet"])
def test_local_file_rows(rng: random.Random, tmp_path: Path, suffix: str) -> None:
    docs = unique_docs(rng, 25)
    write_docs(tmp_path / f"corpus{suffix}", docs)
    table = open_table(tmp_path / f"corpus{suffix}", tmp_path)
    assert texts(table) == docs
    assert where(table, 7) == (str(tmp_path / f"corpus{suffix}"), 8)


def test_json_file_may_hold_json_lines(rng: random.Random, tmp_path: Path) -> None:
    docs = unique_docs(rng, 6)
    (tmp_path / "c.json").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    assert texts(open_table(tmp_path / "c.json", tmp_path)) == docs


def test_local_folder_reads_every_data_file(rng: random.Random, tmp_path: Path) -> None:
    docs = unique_docs(rng, 30)
    write_docs(tmp_path / "data" / "a.jsonl", docs[:10])
    write_docs(tmp_path / "data" / "sub" / "b.jsonl", docs[10:])
    (tmp_path / "data" / "README.md").write_text("not data")
    table = open_table(tmp_path / "data", tmp_path)
    assert texts(table) == docs
    assert where(table, 12) == (str(tmp_path / "data" / "sub" / "b.jsonl"), 3)


def test_parquet_folder_names_the_file_of_a_row(rng: random.Random, tmp_path: Path) -> None:
    docs = unique_docs(rng, 12)
    write_docs(tmp_path / "p" / "a.parquet", docs[:5])
    write_docs(tmp_path / "p" / "b.parquet", docs[5:])
    table = open_table(tmp_path / "p", tmp_path)
    assert texts(table) == docs and where(table, 6) == (str(tmp_path / "p" / "b.parquet"), 2)


def test_blank_lines_and_crlf_are_not_rows(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(b"first\r\n\r\nsecond\n\n\nthird")
    table = open_table(tmp_path / "t.txt", tmp_path)
    assert texts(table) == ["first", "second", "third"]
    assert [where(table, i)[1] for i in range(3)] == [1, 3, 6]


def test_each_kind_of_bad_jsonl_row_is_named(rng: random.Random, tmp_path: Path) -> None:
    good = [json.dumps({"text": d}).encode() for d in unique_docs(rng, 3)]
    bad = [
        b'{"text": "caf\xe9 latin-1"}',
        b'{"text": "cut off',
        b'["a list"]',
        b'{"body": "no text field"}',
        b'{"text": null}',
        b'{"text": 42}',
        b'{"text": "  "}',
    ]
    (tmp_path / "b.jsonl").write_bytes(b"\n".join([good[0], *bad, good[1], good[2]]) + b"\n")
    table = open_table(tmp_path / "b.jsonl", tmp_path)
    name = str(tmp_path / "b.jsonl")
    assert reasons(table) == {
        (name, 2): "BadRow: not valid UTF-8 (byte 13)",
        (name, 3): "BadRow: not valid JSON (Unterminated string starting at at column 10)",
        (name, 4): "BadRow: not a JSON object but list",
        (name, 5): "BadRow: no 'text' value",
        (name, 6): "BadRow: no 'text' value",
        (name, 7): "BadRow: 'text' is int, not text",
        (name, 8): "BadRow: empty document",
    }
    assert [table.text(i) for i in (0, 8, 9)] == [json.loads(g)["text"] for g in good]


def test_bad_txt_rows(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(b"fine\n\xff\xfe broken\n   \nalso fine\n")
    table = open_table(tmp_path / "t.txt", tmp_path)
    name = str(tmp_path / "t.txt")
    assert reasons(table) == {
        (name, 2): "BadRow: not valid UTF-8 (byte 0)",
        (name, 3): "BlankRow: a blank line",  # skipped, but not counted as bad
    }


def test_null_in_a_parquet_text_column_is_a_bad_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": ["a", None, ""]}), tmp_path / "n.parquet")
    table = open_table(tmp_path / "n.parquet", tmp_path)
    name = str(tmp_path / "n.parquet")
    assert reasons(table) == {
        (name, 2): "BadRow: no 'text' value",
        (name, 3): "BadRow: empty document",
    }


def test_parquet_column_that_is_not_text(tmp_path: Path) -> None:
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "i.parquet")
    with pytest.raises(ConfigError, match=r"^data\.text_field = 'text': .* holds int64, not text"):
        open_table(tmp_path / "i.parquet", tmp_path)


@pytest.mark.parametrize("content", [b"", b"\n\n\r\n"])
@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_empty_file(tmp_path: Path, suffix: str, content: bytes) -> None:
    (tmp_path / f"e{suffix}").write_bytes(content)
    with pytest.raises(
        ConfigError, match=r"^data\.dataset = '.*e\.(txt|jsonl)' holds no documents"
    ):
        open_table(tmp_path / f"e{suffix}", tmp_path)


def test_folder_of_empty_files(tmp_path: Path) -> None:
    for name in ("a.jsonl", "b.jsonl"):
        (tmp_path / "d" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "d" / name).write_text("")
    with pytest.raises(ConfigError, match=r"holds no documents \(every file is empty\)"):
        open_table(tmp_path / "d", tmp_path)


def test_json_list_file_that_does_not_parse(tmp_path: Path) -> None:
    (tmp_path / "l.json").write_text('[{"text": "a"}, {oops')
    with pytest.raises(ConfigError, match=r"l\.json is not valid JSON .*write one record per line"):
        open_table(tmp_path / "l.json", tmp_path)


def test_missing_local_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.dataset = '.*nope\.jsonl': no such file"):
        open_table(tmp_path / "nope.jsonl", tmp_path)


def test_unknown_file_type(tmp_path: Path) -> None:
    (tmp_path / "d.csv").write_text("text\nhello\n")
    with pytest.raises(ConfigError, match=r"^data\.dataset = '.*d\.csv': unknown file type"):
        open_table(tmp_path / "d.csv", tmp_path)


def test_folder_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("text")
    with pytest.raises(ConfigError, match=r"^data\.dataset = '.*empty': the folder has no data"):
        open_table(tmp_path / "empty", tmp_path)


def test_relative_missing_path_is_not_sent_to_the_hub(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^data\.dataset = './corpus': no such file or folder"):
        open_table("./corpus", tmp_path)


def test_folder_of_mixed_kinds(rng: random.Random, tmp_path: Path) -> None:
    write_docs(tmp_path / "d" / "a.txt", unique_docs(rng, 3))
    write_docs(tmp_path / "d" / "b.jsonl", unique_docs(rng, 3))
    with pytest.raises(ConfigError, match=r"has mixed \(json, text\) data files"):
        open_table(tmp_path / "d", tmp_path)


def test_one_odd_first_record_is_a_bad_row_not_a_wrong_field(
    rng: random.Random, tmp_path: Path
) -> None:
    docs = unique_docs(rng, 20)
    lines = [json.dumps({"meta": "header"})] + [json.dumps({"text": d}) for d in docs]
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    table = open_table(tmp_path / "m.jsonl", tmp_path)
    assert reasons(table) == {(str(tmp_path / "m.jsonl"), 1): "BadRow: no 'text' value"}


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_missing_text_field(rng: random.Random, tmp_path: Path, suffix: str) -> None:
    write_docs(tmp_path / f"c{suffix}", unique_docs(rng, 5), field="body")
    with pytest.raises(
        ConfigError,
        match=r"^data\.text_field = 'text': .* has no such column; "
        r"choose one of \['body', 'id'\]",
    ):
        open_table(tmp_path / f"c{suffix}", tmp_path, text_field="text")


def test_hub_dataset_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ConfigError,
        match=r"^data\.dataset = 'c4' could not be loaded \(.*allenai/"
        r"c4.*\); this machine may be offline: use the default "
        r"'stdlib_docs' or a local file$",
    ):
        open_source(local_cfg("c4", tmp_path), 0, 1)


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
    state = json.loads(json.dumps(stream.state_dict()))
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
            StreamedDocuments(source, "s", ["text"], 0, 1).next_text()


def test_streamed_bad_row_is_skippable(tmp_path: Path) -> None:
    (tmp_path / "s.jsonl").write_text('{"text": "a"}\n{"text": 7}\n{"text": "b"}\n')
    stream = streamed(tmp_path / "s.jsonl", 0, 1)
    assert stream.next_text() == "a"
    with pytest.raises(BadRow, match="'text' is int, not text"):
        stream.next_text()
    assert stream.row == 2 and stream.next_text() == "b"
