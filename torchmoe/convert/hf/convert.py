"""The two directions: a Hugging Face folder -> a torchmoe seed checkpoint (step-0) plus the
[model]/[moe] keys that rebuild the model, and a torchmoe checkpoint -> a Hugging Face folder.
Export then import gives back every tensor bit for bit (float32 stays float32)."""

import json
import shlex
import shutil
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.load import build_config, load_config
from torchmoe.config.registry import build_model, get_model_spec
from torchmoe.config.schema import Checkpoint, JobConfig
from torchmoe.config.validate import validate
from torchmoe.convert.hf import adapter_for_family, adapter_for_model_type
from torchmoe.convert.hf.checkpoint_rows import CheckpointRows
from torchmoe.convert.hf.fp8 import SCALE_SUFFIX, block_size, check_scales, dequantize_one
from torchmoe.convert.hf.io import (
    SafetensorsFolder,
    dcp_model_metadata,
    read_json,
    write_hf_shards,
)
from torchmoe.convert.hf.mapping import from_hf, is_expert_stack, to_hf
from torchmoe.data.hf_tokenizer import HFTokenizer
from torchmoe.data.tokenizer import build_tokenizer
from torchmoe.train.checkpoint import CheckpointManager, TrainState, load_model_weights
from torchmoe.train.fingerprint import job_fingerprint
from torchmoe.train.split_experts import holds_split_experts
from torchmoe.train.tensors_on_demand import TensorsOnDemand


def _empty_folder(path: Path, flag: str) -> None:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise ConfigError(
            f"{flag} {path} already exists and is not an empty folder; choose a new one"
        )


def _meta_state(cfg: JobConfig) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """The model ``cfg`` describes, on the meta device, and its state dict."""
    with torch.device("meta"):
        model = build_model(cfg)
    return model, model.state_dict()


def _flavor(family: str, values: dict) -> str:
    """The family's flavor that agrees with every imported key it sets (so a released model
    gets its flavor's training settings, e.g. balancing), else the first one."""
    flavors = get_model_spec(family).flavors
    for name, flavor in flavors.items():
        if all(flavor.get(s, {}).get(k, v) == v for s in values for k, v in values[s].items()):
            return name
    return next(iter(flavors))


def config_from_hf(
    hf: dict, names: Collection[str], family: str | None = None
) -> tuple[JobConfig, dict]:
    """config.json and the checkpoint's tensor names -> (validated JobConfig, the [model]/[moe]
    values it sets)."""
    block_size(hf)  # a quantization this importer cannot undo is one line
    adapter = adapter_for_model_type(hf.get("model_type"))
    values = adapter.to_job(hf, names)
    name = family or adapter.family
    values["model"] = {"name": name, "flavor": _flavor(name, values), **values["model"]}
    cfg = build_config(values, [], where="config.json")
    validate(cfg)
    return cfg, values


def _check_names(
    hf_dir: Path, have: dict[str, torch.Tensor], want: dict[str, torch.Tensor]
) -> None:
    """The folder's tensors must be exactly those config.json implies, with their shapes."""
    missing = [k for k in want if k not in have]
    if missing:
        raise ConfigError(
            f"{hf_dir}: tensor {missing[0]} is missing ({len(missing)} missing); "
            "config.json describes a model with it"
        )
    extra = [k for k in have if k not in want]
    if extra:
        raise ConfigError(
            f"{hf_dir}: tensor {extra[0]} does not belong to the model config.json "
            f"describes ({len(extra)} such tensors)"
        )
    for k, t in want.items():
        if tuple(have[k].shape) != tuple(t.shape):
            raise ConfigError(
                f"{hf_dir}: tensor {k} has shape {list(have[k].shape)}, "
                f"config.json implies {list(t.shape)}"
            )


class HFWeights:
    """A Hugging Face folder's model, as torchmoe tensors made on request: ``weights(names)``
    reads only what those tensors are made from (each expert of a stack, fp8 scales), so an
    import holds one tensor's sources at a time, not the model."""

    def __init__(self, hf_dir: Path, family: str | None = None) -> None:
        hf = read_json(hf_dir / "config.json")
        adapter = adapter_for_model_type(hf.get("model_type"))
        self.files = SafetensorsFolder(hf_dir)
        self.block = block_size(hf)
        have = dict(self.files.meta)
        if self.block is not None:  # DeepSeek-V3's fp8 release: weights come out float32
            check_scales(have, self.block)  # now: a bad scale is one line before any write
            have = {k: t.float() for k, t in have.items() if not k.endswith(SCALE_SUFFIX)}
        self.cfg, self.values = config_from_hf(hf, have.keys(), family)
        self.alias: dict[str, str] = {}  # a Hugging Face name read under another name
        if "lm_head.weight" not in have and hf.get("tie_word_embeddings"):
            if "model.embed_tokens.weight" in have:  # torchmoe's output head is its own tensor
                self.alias["lm_head.weight"] = "model.embed_tokens.weight"
                have["lm_head.weight"] = have["model.embed_tokens.weight"]
        _, self.expected = _meta_state(self.cfg)
        self.dtypes = {k: t.dtype for k, t in self.expected.items()}
        self.rules = adapter.rules(self.cfg, hf)
        _check_names(hf_dir, have, to_hf(self.expected, self.rules, adapter.family))
        primary = [r for r in self.rules if not r.copy]
        self.sources = {
            name: list(to_hf({name: t}, primary, adapter.family))
            for name, t in self.expected.items()
        }

    def weights(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The torchmoe tensors ``names``, in the model's dtypes."""
        wanted = {h: None for name in names for h in self.sources[name]}
        made = from_hf(_LazyTensors(self, list(wanted)), self.rules, self.dtypes)
        return {k: made[k] for k in names}

    def read(self, hf_name: str) -> torch.Tensor:
        """One Hugging Face tensor (under the name it is read as), dequantized if fp8."""
        source = self.alias.get(hf_name, hf_name)
        tensor = self.files.read_one(source)
        scale = source + SCALE_SUFFIX
        if self.block is not None and scale in self.files.where:
            tensor = dequantize_one(tensor, self.files.read_one(scale), self.block)
        return tensor


class _LazyTensors(Mapping[str, torch.Tensor]):
    """Hugging Face tensors by name, each read when it is looked up (``from_hf`` looks each
    up once), so an expert stack is built holding one expert at a time."""

    def __init__(self, model: HFWeights, names: list[str]) -> None:
        self.model, self.names = model, names

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.model.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __contains__(self, name: object) -> bool:  # by name: Mapping's own would read it
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)


def read_hf(
    hf_dir: Path, family: str | None = None
) -> tuple[JobConfig, dict, dict[str, torch.Tensor]]:
    """A Hugging Face folder -> (JobConfig, the [model]/[moe] values it sets, torchmoe state
    dict in the model's dtypes), the whole model in memory (generation, tests)."""
    model = HFWeights(hf_dir, family)
    return model.cfg, model.values, model.weights(list(model.expected))


def import_hf(hf_dir: Path, out: Path, family: str | None = None) -> tuple[JobConfig, dict]:
    """Write ``out/step-0`` (a seed checkpoint the Trainer starts from with checkpoint.enable
    and checkpoint.folder = out), the folder's tokenizer files (if any) into ``out/tokenizer``
    and ``out/model.toml``, which points at both; returns the JobConfig and the [model]/[moe]
    values it sets."""
    _empty_folder(out, "--out")
    hf = HFWeights(hf_dir, family)
    cfg, values = hf.cfg, hf.values
    tokenizer = _checked_tokenizer(hf_dir, cfg)  # before anything is written
    model, _ = _meta_state(cfg)  # stays on meta: the planner makes each tensor as it is written
    out.mkdir(parents=True, exist_ok=True)
    job = job_fingerprint(cfg, model, tokenizer_digest=None)  # weights: no tokenizer yet
    CheckpointManager(
        Checkpoint(enable=True), out, model, None, None, None, TrainState(), job=job
    ).save_seed(TensorsOnDemand(lambda name: hf.weights([name])[name], prefix="train.model."))
    keep_original_configs(hf_dir, out / ORIGINAL)
    if tokenizer is not None:
        copy_tokenizer_files(tokenizer, out / "tokenizer")
        cfg.model.tokenizer_path = values["model"]["tokenizer_path"] = str(
            (out / "tokenizer").resolve()
        )
    (out / "model.toml").write_text(model_toml(cfg, values, hf_dir, out))
    return cfg, values


# Where an import keeps the released config.json and generation_config.json, for export.
ORIGINAL = "hf_original"
_ORIGINAL_FILES = ("config.json", "generation_config.json")
# config.json keys an export takes from the released model even though it writes them too.
_KEPT = ("max_position_embeddings",)
# Released keys an export drops: older spellings transformers would read instead of ours
# (rope_scaling, rope_theta beside rope_parameters; torch_dtype), remote code the folder does
# not carry (auto_map), and the quantization of weights written dequantized.
_DROPPED = ("rope_scaling", "rope_theta", "torch_dtype", "auto_map", "quantization_config")
# Tensors written in float32 whatever --dtype: the router's gate and score bias, which
# transformers keeps in float32 (bf16 would lose the expert-bias steps).
_FP32_SUFFIXES = ("e_score_correction_bias", ".gate.weight")
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_Piece = tuple[str, int | None, torch.Tensor]  # what an export reads and writes at a time


def keep_original_configs(hf_dir: Path, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in _ORIGINAL_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, folder / name)


def _checked_tokenizer(hf_dir: Path, cfg: JobConfig) -> HFTokenizer | None:
    """The folder's tokenizer, if it has one, checked to load and to fit the embedding."""
    if not (hf_dir / "tokenizer.json").is_file():
        return None
    tokenizer = HFTokenizer(hf_dir, str(hf_dir))
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"{hf_dir}: the tokenizer has {tokenizer.vocab_size} ids but config.json's "
            f"vocab_size is {cfg.model.vocab_size}; the folder's tokenizer and model disagree"
        )
    return tokenizer


def copy_tokenizer_files(tokenizer: HFTokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, source in tokenizer.files.items():
        shutil.copyfile(source, folder / name)


def _keys(cfg: JobConfig, values: dict) -> list[tuple[str, Any]]:
    """('section.key', value as the config holds it) for each key the import sets."""
    return [(f"{s}.{k}", getattr(getattr(cfg, s), k)) for s in values for k in values[s]]


def model_toml(cfg: JobConfig, values: dict, hf_dir: Path, out: Path) -> str:
    """A recipe fragment: the [model]/[moe] keys of the imported model and the [checkpoint]
    keys that start training from its weights."""
    lines = [f"# Written by scripts/convert_hf.py import from {hf_dir.resolve()}."]
    section = None
    for dotted, value in _keys(cfg, values) + [
        ("checkpoint.enable", True),
        ("checkpoint.folder", str(out.resolve())),
    ]:
        s, k = dotted.split(".")
        if s != section:
            lines += ["", f"[{s}]"] if section else [f"[{s}]"]
            section = s
        lines.append(f"{k} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def cli_overrides(cfg: JobConfig, values: dict, out: Path) -> str:
    """The same keys as ``--section.key value`` arguments (shell-quoted)."""

    def arg(value: Any) -> str:
        if isinstance(value, list):
            return ",".join(map(str, value))
        return str(value).lower() if isinstance(value, bool) else str(value)

    args = [a for k, v in _keys(cfg, values) for a in (f"--{k}", arg(v))]
    return shlex.join(args + ["--checkpoint.enable", "--checkpoint.folder", str(out.resolve())])


def export_hf(
    step_dir: Path, recipe_args: list[str], out: Path, max_shard_bytes: int, dtype: str = "bf16"
) -> JobConfig:
    """Write the model of checkpoint ``step_dir`` (built by ``--config ... [--section.key value
    ...]``) as a Hugging Face folder: config.json, generation_config.json, safetensors in
    ``dtype`` (bf16 or fp32) and, when model.tokenizer_path is a Hugging Face tokenizer, its
    files. A checkpoint folder an import made carries the released config.json: its keys are
    kept, with those torchmoe owns (the architecture it trained) updated."""
    _empty_folder(out, "--out")
    cfg, _ = load_config(recipe_args)
    adapter = adapter_for_family(cfg.model.name)
    original = _original(step_dir, "config.json")
    ours = {
        "architectures": [adapter.architecture],
        "model_type": adapter.model_type,
        **adapter.to_hf_config(cfg),
    }
    kept = {k: v for k, v in original.items() if k not in _DROPPED}
    hf = {**kept, **ours} | {k: original[k] for k in _KEPT if k in original}
    _, expected = _meta_state(cfg)
    stored = dcp_model_metadata(step_dir, expected)
    rules = adapter.rules(cfg, hf)
    rows = CheckpointRows(step_dir)
    split = holds_split_experts(rows.metadata.state_dict_metadata)  # read once, not per piece
    # (name, first expert or None, tensor): an expert stack DCP stored whole is read and
    # written one expert at a time; the rest one tensor at a time
    pieces: list[_Piece] = []
    for name, t in stored.items():
        if rows.readable(name) and is_expert_stack(name, rules):
            pieces += [(name, e, t[e : e + 1]) for e in range(t.shape[0])]
        else:
            pieces.append((name, None, t))

    def convert(piece: _Piece) -> dict[str, torch.Tensor]:
        name, first, t = piece
        tensors = to_hf({name: t}, rules, adapter.family, first_expert=first or 0)
        return {
            k: t.float() if k.endswith(_FP32_SUFFIXES) else t.to(EXPORT_DTYPES[dtype])
            for k, t in tensors.items()
        }

    def load(piece: _Piece) -> _Piece:
        name, first, t = piece
        if rows.readable(name):
            start = first or 0
            return name, first, rows.rows(name, start, start + t.shape[0])
        group = {name: t}
        load_model_weights(step_dir, group, split)  # a multi-rank run's shards: through DCP
        return name, first, group[name]

    hf["dtype"] = str(EXPORT_DTYPES[dtype]).removeprefix("torch.")
    write_hf_shards(out, pieces, load, convert, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    tokenizer = build_tokenizer(cfg.model.tokenizer_path)
    generation = _original(step_dir, "generation_config.json") or {
        k: v
        for k, v in (
            ("bos_token_id", tokenizer.bos_id),
            ("eos_token_id", tokenizer.eos_id),
            ("pad_token_id", tokenizer.pad_id),
        )
        if v is not None
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    if isinstance(tokenizer, HFTokenizer):  # a released model's tokenizer goes back with it
        copy_tokenizer_files(tokenizer, out)
    return cfg


def _original(step_dir: Path, name: str) -> dict:
    """The released model's ``name`` an import kept beside the checkpoint, or {}."""
    path = step_dir.parent / ORIGINAL / name
    return read_json(path) if path.is_file() else {}
