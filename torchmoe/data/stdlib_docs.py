"""The default dataset: docstrings of the Python standard library (PSF license).

Every machine that runs this repo has the text, so training needs no download. Files are parsed
with ``ast`` and never imported (importing runs code and pulls in optional C modules). The result
is cached as JSONL, one ``{"text": ...}`` per line, so the datasets library can also read it.
"""

import ast
import json
import os
import sys
import sysconfig
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

# Shorter docstrings are mostly one-line summaries ("Return the name.") that teach little.
MIN_CHARS = 200
# Bump when the extraction rules change, so caches written by older rules are not reused.
FORMAT_VERSION = 1
_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
# Tests, demos, the IDE and bundled third-party code are not the library's documentation.
EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "__phello__",
        "__pycache__",
    }
)


def resolve_cache_dir(cache_dir: str) -> Path:
    """``data.cache_dir``, where '' means ~/.cache/torchmoe."""
    return Path(cache_dir).expanduser() if cache_dir else Path.home() / ".cache" / "torchmoe"


def load_stdlib_docs(cache_dir: str) -> list[str]:
    """The corpus, generated from this interpreter's stdlib on first use and cached per Python
    minor version (the stdlib, hence the text, differs between versions)."""
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    path = resolve_cache_dir(cache_dir) / f"stdlib_docs_v{FORMAT_VERSION}_{version}.jsonl"
    if path.exists():
        with open(path, encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f]
    docs = extract_docstrings(Path(sysconfig.get_paths()["stdlib"]))
    _write_atomically(path, docs)
    return docs


def extract_docstrings(root: Path) -> list[str]:
    """Module, class and function docstrings of at least MIN_CHARS under ``root``, without
    repeats, in sorted path and then source order, so every machine with the same stdlib gets the
    same list."""
    docs: dict[str, None] = {}  # an ordered set
    for path in _python_files(root):
        for doc in _docstrings(path):
            if len(doc) >= MIN_CHARS:
                docs.setdefault(doc)
    return list(docs)


def _python_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_DIRS and not d.startswith("config-")]
        found += [Path(folder, name) for name in files if name.endswith(".py")]
    return sorted(found)


def _docstrings(path: Path) -> list[str]:
    """Docstrings of one file in source order, or none when it does not parse (e.g. deliberately
    broken test data, or a file in a legacy encoding)."""
    try:
        with warnings.catch_warnings():  # invalid escape sequences warn on newer Pythons
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError):  # ValueError covers undecodable bytes and NUL bytes
        return []
    return [doc for node in _definitions(tree) if (doc := ast.get_docstring(node, clean=True))]


def _definitions(node: ast.AST) -> Iterator[ast.AST]:
    """The module and every class or function in it, including those under if/try/with blocks.
    Only statements are visited: expressions make up most of a tree and hold no docstrings."""
    if isinstance(node, _DOCUMENTED):
        yield node
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
            yield from _definitions(child)


def _write_atomically(path: Path, docs: list[str]) -> None:
    """Write to a temporary name, then rename: concurrent ranks or an interrupted run never leave
    a half-written cache behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "x", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({"text": doc}) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
