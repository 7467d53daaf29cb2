"""Hugging Face checkpoints in and out of torchmoe.

    python scripts/convert_hf.py import --hf HF_DIR --out CKPT_DIR [--family NAME]
    python scripts/convert_hf.py export --checkpoint CKPT_DIR/step-N --config RECIPE.toml \\
        [--section.key value ...] --out HF_DIR [--max-shard-size 5GB] [--dtype bf16|fp32]

import reads config.json and *.safetensors (one file, or shards listed in
model.safetensors.index.json) and writes CKPT_DIR/step-0, a seed checkpoint, the folder's
tokenizer.json (and tokenizer_config.json) into CKPT_DIR/tokenizer, and CKPT_DIR/model.toml with
the [model]/[moe] keys of the model; it prints the same keys as overrides. Train from it with
``./run_train.sh --config CKPT_DIR/model.toml`` or with any recipe
plus the printed overrides. export reads only the model part of a checkpoint (a seed or a
training step) and writes safetensors in --dtype (bf16 by default; sharded, with an index, above
--max-shard-size), config.json for the family's transformers class (the released config.json an
import kept, with the keys torchmoe owns updated) and generation_config.json, plus the tokenizer
files when model.tokenizer_path is a Hugging Face tokenizer. Mistakes print one line and exit 2.
"""

import argparse
import ctypes
import re
import sys
from pathlib import Path

from torchmoe.config.errors import ConfigError
from torchmoe.convert.hf.convert import cli_overrides, export_hf, import_hf

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        raise ConfigError(f"{self.prog}: {message}")


def _size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?B?)\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"--max-shard-size {text!r}: give a size such as 5GB, 500MB or 1000000")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="convert_hf.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    imp = sub.add_parser(
        "import", help="Hugging Face folder -> torchmoe seed checkpoint", allow_abbrev=False
    )
    imp.add_argument("--hf", required=True, type=Path, help="folder with config.json + safetensors")
    imp.add_argument("--out", required=True, type=Path, help="new checkpoint folder")
    imp.add_argument("--family", help="torchmoe model.name to build (default: from model_type)")
    exp = sub.add_parser(
        "export", help="torchmoe checkpoint -> Hugging Face folder", allow_abbrev=False
    )
    exp.add_argument("--checkpoint", required=True, type=Path, help="a step-N folder")
    exp.add_argument("--out", required=True, type=Path, help="new Hugging Face folder")
    exp.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard")
    exp.add_argument(
        "--dtype", default="bf16", choices=["bf16", "fp32"], help="dtype of the written weights"
    )
    return p


def _return_freed_blocks_to_the_os() -> None:
    """Conversion streams tensors of a few MiB through memory, and glibc keeps such blocks once
    freed (its mmap threshold rises to them), so the process would grow by every tensor read.
    Pinning the threshold at 1 MiB maps and unmaps larger blocks; other C libraries: no-op."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _return_freed_blocks_to_the_os()
    try:
        args, rest = _parser().parse_known_args(argv)
        if args.command == "import":
            if rest:
                raise ConfigError(f"import: unexpected arguments {' '.join(rest)}")
            cfg, values = import_hf(args.hf, args.out, args.family)
            print(
                f"wrote {args.out / 'step-0'} and {args.out / 'model.toml'}; train from it "
                f"with --config {args.out / 'model.toml'}, or add to a recipe:"
            )
            print(cli_overrides(cfg, values, args.out))
        else:
            export_hf(args.checkpoint, rest, args.out, _size(args.max_shard_size), args.dtype)
            print(f"wrote {args.out}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
