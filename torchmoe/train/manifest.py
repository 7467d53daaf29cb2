"""A checkpoint's manifest: written last, it is what makes a step folder trustworthy.

``manifest.json`` holds the step, the job's fingerprint (fingerprint.py) and every file's size and
xxh3-64 checksum. A folder whose manifest is missing, unreadable or disagrees with a file was not
finished or was damaged since, and is never loaded. Hashing is split over the ranks (each hashes
every world-th file, in parallel) so that checking hundreds of GB costs one read of each file
spread over the job; xxh3 runs at memory speed, so the read is the cost.
"""

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist
import xxhash

MANIFEST = "manifest.json"
FORMAT = 1
_CHUNK = 16 * 2**20


def file_digest(path: Path) -> dict[str, Any]:
    """Size and xxh3-64 checksum of one file, read in chunks."""
    h = xxhash.xxh3_64()
    size = 0
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return {"bytes": size, "xxh3_64": h.hexdigest()}


def _world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(local: dict) -> dict:
    """Every rank's part of a dict, merged, on every rank (a collective)."""
    world = _world()[1]
    if world == 1:
        return local
    parts: list[dict] = [{} for _ in range(world)]
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in sorted(part.items())}


def digest_share(folder: Path, collective: bool = True) -> dict[str, dict[str, Any]]:
    """Size and checksum of this rank's share of the files in ``folder`` (every world-th file),
    or of all of them when not ``collective``; no communication, so a background thread may
    call it."""
    rank, world = _world() if collective else (0, 1)
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)
    return {name: file_digest(folder / name) for name in names[rank::world]}


def write(folder: Path, step: int, job: dict, files: dict[str, dict[str, Any]]) -> None:
    """Write ``folder/manifest.json`` durably: a temporary file, fsync, rename, fsync of the
    folder, so that a manifest on disk always describes files already on disk."""
    body = {"format": FORMAT, "step": step, "job": job, "files": files}
    tmp = folder / f"{MANIFEST}.tmp"
    with open(tmp, "w") as f:
        json.dump(body, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    tmp.rename(folder / MANIFEST)
    sync_folder(folder)


def sync_folder(folder: Path) -> None:
    """fsync a folder, so that renames and new files in it survive a power cut."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read(folder: Path) -> tuple[dict | None, str | None]:
    """The manifest of ``folder``, or None and why it cannot be used."""
    path = folder / MANIFEST
    if not path.is_file():
        return None, f"no {MANIFEST}: its save did not finish, or an older torchmoe wrote it"
    try:
        body = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        return None, f"{MANIFEST} is unreadable ({str(e)[:100]})"
    problem = _malformed(body)
    return (None, f"{MANIFEST} is malformed ({problem})") if problem else (body, None)


def _malformed(body: Any) -> str | None:
    """What is wrong with a parsed manifest's structure, if anything."""
    if not isinstance(body, dict):
        return "not an object"
    if body.get("format") != FORMAT:
        return f"format {body.get('format')!r}, this torchmoe reads {FORMAT}"
    step, files, job = body.get("step"), body.get("files"), body.get("job")
    if type(step) is not int or step < 0:
        return f"step {step!r}"
    if not isinstance(job, dict):
        return "no job fingerprint"
    if not isinstance(files, dict) or ".metadata" not in files:
        return "no file list with .metadata"
    for name, entry in files.items():
        ok = isinstance(entry, dict) and type(entry.get("bytes")) is int
        if not ok or not isinstance(entry.get("xxh3_64"), str) or "/" in name:
            return f"entry {name!r}"
    return None


def verify(
    folder: Path, step: int | None, collective: bool = True
) -> tuple[dict | None, str | None]:
    """Check ``folder`` against its manifest: (manifest, None) when every listed file is there
    with its size and checksum (and, unless ``step`` is None, the manifest is for ``step``),
    else (None, the first problem: file and reason). Collective over all ranks unless
    ``collective`` is False."""
    body, problem = read(folder)
    if body is not None and step is not None and body["step"] != step:
        body, problem = None, f"its {MANIFEST} is for step {body['step']}"
    rank, world = _world() if collective else (0, 1)
    local: dict[str, str] = {MANIFEST: problem} if problem else {}
    for name, want in sorted(body["files"].items())[rank::world] if body else []:
        reason = _file_problem(folder / name, want)
        if reason:
            local[name] = f"{name}: {reason}"
    problems = gather(local) if collective else local  # every rank decides alike
    if not problems:
        return body, None
    return None, problems.get(MANIFEST) or problems[min(problems)]


def _file_problem(path: Path, want: dict[str, Any]) -> str | None:
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size != want.get("bytes"):
        return f"{size} bytes, the manifest says {want.get('bytes')}"
    if file_digest(path)["xxh3_64"] != want.get("xxh3_64"):
        return "contents differ from the manifest's checksum"
    return None
