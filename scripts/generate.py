"""Sample text from a torchmoe checkpoint or a Hugging Face folder.

    python scripts/generate.py --checkpoint CKPT/step-N --config RECIPE.toml \\
        [--section.key v ...] --prompt "The router" [--prompt ...] [--chat] \\
        [--max-new-tokens 64] [--temperature 0 --top-p 1.0 --seed 0]
    python scripts/generate.py --hf HF_DIR --prompt ... (the folder's tokenizer.json)

Greedy at --temperature 0 (the default), deterministic; else top-p sampling from --seed.
--chat renders each prompt as one user message with the tokenizer's chat template and the
assistant header. Prints one block per prompt. Runs on the GPU when there is one, else the CPU
(float32). Mistakes print one line and exit 2.
"""

import argparse
import sys
from pathlib import Path

import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import load_config
from torchmoe.config.registry import build_model
from torchmoe.config.schema import JobConfig
from torchmoe.convert.hf.convert import ORIGINAL, read_hf
from torchmoe.convert.hf.io import read_dcp_model, read_json
from torchmoe.data.bad_rows import BadRow
from torchmoe.data.formats import ChatRenderer
from torchmoe.data.tokenizer import Tokenizer, build_tokenizer
from torchmoe.inference.generate import generate


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        raise ConfigError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="generate.py", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="a torchmoe step-N folder (+ --config)")
    source.add_argument("--hf", type=Path, help="a Hugging Face model folder")
    p.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    p.add_argument("--chat", action="store_true", help="render prompts with the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--no-kv-cache",
        action="store_true",
        help="rerun the whole prefix for every token (the reference the cache is tested against)",
    )
    return p


def load(
    args: argparse.Namespace, recipe: list[str]
) -> tuple[JobConfig, dict[str, torch.Tensor], Tokenizer]:
    """The model's config, weights and tokenizer."""
    if args.hf is not None:
        if recipe:
            raise ConfigError(f"--hf takes no recipe arguments: {' '.join(recipe)}")
        cfg, _, state = read_hf(args.hf)
        return cfg, state, build_tokenizer(str(args.hf))
    cfg, _ = load_config(recipe)
    with torch.device("meta"):
        meta = build_model(cfg)
    state = read_dcp_model(args.checkpoint, meta.state_dict())
    return cfg, state, build_tokenizer(cfg.model.tokenizer_path)


def build(cfg: JobConfig, state: dict[str, torch.Tensor], longest: int) -> torch.nn.Module:
    """The model in eval mode (float32), dropless (capacity would make a prompt's tokens
    depend on the rest of the batch) and with positions for ``longest`` tokens."""
    cfg.moe.eval_capacity_factor = 0.0
    cfg.training.seq_len = max(cfg.training.seq_len, longest)
    model = build_model(cfg)
    model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device).eval()


def stop_ids(args: argparse.Namespace, tokenizer: Tokenizer) -> set[int]:
    """The tokenizer's EOS and the eos_token_id(s) of the model's generation_config.json (the
    --hf folder's, or the one an import kept beside the checkpoint)."""
    folder = args.hf if args.hf is not None else args.checkpoint.parent / ORIGINAL
    config = folder / "generation_config.json"
    listed = read_json(config).get("eos_token_id") if config.is_file() else None
    listed = listed if isinstance(listed, list) else [listed]
    return {tokenizer.eos_id} | {i for i in listed if isinstance(i, int)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, recipe = _parser().parse_known_args(argv)
        if args.max_new_tokens <= 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
            raise ConfigError("--max-new-tokens > 0, --temperature >= 0 and 0 < --top-p <= 1")
        cfg, state, tokenizer = load(args, recipe)
        if args.chat:
            chat = ChatRenderer(tokenizer)
            texts = [
                chat.render([{"role": "user", "content": p}], add_generation_prompt=True)
                for p in args.prompt
            ]
            prompts = [tokenizer.encode_with_offsets(t)[0] for t in texts]
        else:
            prompts = [tokenizer.encode(p) for p in args.prompt]
        if not all(prompts):
            raise ConfigError("--prompt is empty: give each prompt some text")
        model = build(cfg, state, max(map(len, prompts)) + args.max_new_tokens)
        outputs = generate(
            model,
            prompts,
            args.max_new_tokens,
            stop_ids(args, tokenizer),
            args.temperature,
            args.top_p,
            args.seed,
            kv_cache=not args.no_kv_cache,
        )
    except (ConfigError, BadRow) as e:  # BadRow: the chat template refused a prompt
        print(f"error: {e}", file=sys.stderr)
        return 2
    for prompt, ids in zip(args.prompt, outputs):
        print(f"=== {prompt}\n{tokenizer.decode(ids)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
