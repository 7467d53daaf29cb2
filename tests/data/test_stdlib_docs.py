import random
import sys
from pathlib import Path

from torchmoe.data.stdlib_docs import MIN_CHARS, extract_docstrings, load_stdlib_docs


def long_doc(rng: random.Random, tag: str) -> str:
    words = ["".join(rng.choices("abcdefghij", k=rng.randint(2, 8))) for _ in range(60)]
    return f"{tag} " + " ".join(words)


def write_module(path: Path, docstring: str, body: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'"""{docstring}"""\n{body}')


def test_extracts_module_class_function_docstrings_in_path_order(
    rng: random.Random, tmp_path: Path
) -> None:
    docs = {tag: long_doc(rng, tag) for tag in ("mod", "cls", "fn", "async", "pkg", "dup")}
    write_module(
        tmp_path / "b.py",
        docs["mod"],
        f'''
class C:
    """{docs["cls"]}"""

    def f(self):
        """{docs["fn"]}"""

try:
    pass
except ImportError:
    async def g():
        """{docs["async"]}"""

def short():
    """Too short to keep."""
''',
    )
    write_module(tmp_path / "a" / "z.py", docs["pkg"])
    write_module(tmp_path / "a" / "copy.py", docs["pkg"])  # repeats are kept once
    write_module(tmp_path / "c.py", docs["dup"])
    for excluded in ("test", "tests", "site-packages", "idlelib", "lib2to3", "config-3.11"):
        write_module(tmp_path / excluded / "x.py", long_doc(rng, excluded))
    write_module(tmp_path / "broken.py", long_doc(rng, "broken"), "def (:\n")
    (tmp_path / "latin1.py").write_bytes(b'"""caf\xe9 ' + b"x" * MIN_CHARS + b'"""\n')
    (tmp_path / "notes.txt").write_text(long_doc(rng, "txt"))

    got = extract_docstrings(tmp_path)  # files in sorted path order, each in source order
    assert got == [docs["pkg"], docs["mod"], docs["cls"], docs["fn"], docs["async"], docs["dup"]]
    assert extract_docstrings(tmp_path) == got


def test_real_corpus_is_cached_per_python_version(
    stdlib_docs: list[str], stdlib_cache: Path
) -> None:
    assert len(stdlib_docs) > 1000
    assert all(len(doc) >= MIN_CHARS for doc in stdlib_docs)
    assert len(set(stdlib_docs)) == len(stdlib_docs)
    assert 0.5e6 < sum(len(doc.encode()) for doc in stdlib_docs) < 20e6
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    files = [p.name for p in stdlib_cache.glob("stdlib_docs*")]  # no temporary file left over
    assert len(files) == 1 and files[0].endswith(f"_{version}.jsonl")
    assert load_stdlib_docs(str(stdlib_cache)) == stdlib_docs


def test_cached_file_is_what_gets_loaded(
    stdlib_docs: list[str], stdlib_cache: Path, tmp_path: Path
) -> None:
    """A second load must come from the cache, not a new walk of the stdlib."""
    [cache] = stdlib_cache.glob("stdlib_docs*.jsonl")
    copy = tmp_path / cache.name
    lines = cache.read_text().splitlines()
    copy.write_text("\n".join(lines[:3]) + "\n")
    assert load_stdlib_docs(str(tmp_path)) == stdlib_docs[:3]
