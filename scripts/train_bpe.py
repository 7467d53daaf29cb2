"""Train the bundled byte-level BPE on the stdlib_docs corpus and write a tiktoken ranks file.

Usage (from the repo root, with torchmoe installed, e.g. ``pip install -e .``):
    python scripts/train_bpe.py --vocab-size 4096 --out torchmoe/data/assets/stdlib_bpe_4k.tiktoken
"""

import argparse
import time
from pathlib import Path

from torchmoe.data.bpe import train_bpe, write_ranks
from torchmoe.data.stdlib_docs import load_stdlib_docs
from torchmoe.data.tokenizer import build_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=4096,
        help="Ranks in the file, the 256 single bytes included (EOS comes on top).",
    )
    parser.add_argument("--out", type=Path, required=True, help="Ranks file to write.")
    parser.add_argument(
        "--cache-dir", default="", help="Corpus cache, as data.cache_dir ('' = ~/.cache/torchmoe)."
    )
    args = parser.parse_args()

    docs = load_stdlib_docs(args.cache_dir)
    print(f"corpus: {len(docs)} documents, {sum(len(d.encode()) for d in docs) / 1e6:.2f} MB")
    start = time.perf_counter()
    tokens = train_bpe(docs, args.vocab_size)
    print(f"trained {len(tokens)} ranks in {time.perf_counter() - start:.1f} s")
    write_ranks(tokens, args.out)

    # Read the file back the way training will, as a check that it loads and compresses.
    tokenizer = build_tokenizer(str(args.out))
    n_tokens = sum(len(tokenizer.encode(d)) for d in docs)
    print(
        f"wrote {args.out}: n_vocab {tokenizer.vocab_size} with EOS; corpus is {n_tokens} "
        f"tokens, {sum(len(d.encode()) for d in docs) / n_tokens:.2f} bytes per token"
    )


if __name__ == "__main__":
    main()
