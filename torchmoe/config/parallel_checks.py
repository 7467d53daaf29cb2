"""Cross-key checks of [parallelism] and [activation_checkpoint]: degrees that fill the world,
shapes they divide, and recompute names. ``resolve_dp_shard`` is also how ParallelDims
(parallel/dims.py) reads the degrees, so the check and the run agree."""

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import ActivationCheckpoint, JobConfig, Parallelism

# recompute_modules names (Megatron's); torchmoe/parallel/activation_checkpoint.py maps each
# to what it recomputes.
RECOMPUTE_MODULES = ("core_attn", "mla_up_proj", "layernorm", "mlp", "moe", "moe_act")


# A module of the key's name runs inside one of the value's names' modules.
_INSIDE = {"moe_act": {"moe"}, "mlp": {"moe"}, "layernorm": {"mla_up_proj"}}


def _check_names(key: str, names: list[str]) -> None:
    for name in names:
        if name not in RECOMPUTE_MODULES:
            raise ConfigError(
                f"activation_checkpoint.{key} = {names}: unknown module {name!r}; choose from "
                f"{', '.join(RECOMPUTE_MODULES)}"
            )
        if names.count(name) > 1:
            raise ConfigError(f"activation_checkpoint.{key} = {names} lists {name!r} twice")


def check_shared_expert_overlap(cfg: JobConfig) -> None:
    """Op-level selective checkpointing replays a block's ops by count; with the shared experts
    moved into the dispatch, FSDP's hooks ran a different number of record_function ops in
    recompute than in forward (FSDP2 x TP2 x EP2 on gloo) and backward failed."""
    ac = cfg.activation_checkpoint
    if cfg.moe.shared_expert_overlap and ac.mode == "selective" and not ac.recompute_modules:
        raise ConfigError(
            "moe.shared_expert_overlap = true does not work with op-level selective "
            "checkpointing (activation_checkpoint.mode = 'selective' without "
            "recompute_modules); name the modules to recompute, or turn the overlap off"
        )


def check_pp_ep_overlap(cfg: JobConfig) -> None:
    """parallelism.pp_ep_overlap hands turns over at the token all-to-alls of DualPipeV's
    overlapped steps (parallel/ep_overlap.py): without those steps or exchanges it would do
    nothing, and compiled blocks would trace the turn-taking threads."""
    p = cfg.parallelism
    if not p.pp_ep_overlap:
        return
    needs = [
        (
            p.pp > 1 and p.pp_schedule == "DualPipeV",
            "parallelism.pp > 1 with pp_schedule = "
            f"'DualPipeV' (have pp = {p.pp}, {p.pp_schedule!r})",
        ),
        (p.ep > 1, f"parallelism.ep > 1 (have {p.ep})"),
        (p.etp == 1, f"parallelism.etp = 1 (have {p.etp}; not supported yet)"),
        (
            cfg.moe.dispatcher in ("alltoall", "sync_free"),
            "moe.dispatcher = 'alltoall' or "
            f"'sync_free' (have {cfg.moe.dispatcher!r}, which exchanges no all-to-all)",
        ),
        (not cfg.compile.enable, "compile.enable = false (the turns are Python threads)"),
    ]
    for ok, what in needs:
        if not ok:
            raise ConfigError(f"parallelism.pp_ep_overlap = true needs {what}")


def check_offload_modules(ac: ActivationCheckpoint) -> None:
    """Offloading hooks what a module saves in forward: a whole-block checkpoint saves nothing
    inside it to offload, and a module recomputed (or inside one recomputed) would be offloaded
    again during backward."""
    offload = ac.offload_modules
    if not offload:
        return
    _check_names("offload_modules", offload)
    if ac.mode == "full" or (ac.mode == "selective" and not ac.recompute_modules):
        what = "full" if ac.mode == "full" else "selective with the op-level policy"
        raise ConfigError(
            f"activation_checkpoint.offload_modules = {offload} needs mode = 'none' or "
            f"module recompute (recompute_modules), not {what} checkpointing, which keeps no "
            "module's saved tensors to offload"
        )
    for name in offload:
        for other in ac.recompute_modules:
            if other == name or other in _INSIDE.get(name, ()) or name in _INSIDE.get(other, ()):
                raise ConfigError(
                    f"activation_checkpoint.offload_modules lists {name!r} and recompute_modules "
                    f"{other!r}: one runs inside the other; offload or recompute it, not both"
                )


def resolve_dp_shard(p: Parallelism, world_size: int) -> int:
    """The dense FSDP degree, checking that the degrees multiply to the world size.

    ``dp_shard = -1`` takes the ranks left over. An explicit ``dp_shard`` is the dense FSDP
    degree, which ``ep`` borrows from; if instead ``dp_shard x ep`` (times the rest) fills the
    world, ``dp_shard`` is read as the experts' FSDP degree and EP multiplies it: "FSDP2 x EP2"
    on 4 ranks. Either way every rank is used once.
    """
    others = p.dp_replicate * p.cp * p.tp * p.pp
    dp_shard = p.dp_shard
    if dp_shard == -1:
        if world_size % others:
            raise ConfigError(
                f"parallelism: dp_replicate x cp x tp x pp = {others} does not divide the "
                f"{world_size} ranks; change the degrees or NGPU"
            )
        dp_shard = world_size // others
    elif others * dp_shard != world_size and others * dp_shard * p.ep == world_size:
        dp_shard *= p.ep
    if others * dp_shard != world_size:
        raise ConfigError(
            f"parallelism: dp_replicate {p.dp_replicate} x dp_shard {p.dp_shard} x cp {p.cp} "
            f"x tp {p.tp} x pp {p.pp} = {others * dp_shard} but there are {world_size} "
            "ranks; make the product equal NGPU x NNODES (dp_shard = -1 takes the rest)"
        )
    block = dp_shard * p.cp * p.tp
    if block % (p.ep * p.etp):
        raise ConfigError(
            f"parallelism.ep = {p.ep} x parallelism.etp = {p.etp} must divide "
            f"dp_shard x cp x tp = {block}, the ranks expert parallelism borrows from; "
            "on fewer GPUs lower parallelism.ep"
        )
    return dp_shard


def check_parallel_shapes(cfg: JobConfig, heads_keys: tuple[str, ...]) -> None:
    """Degrees against the model's shape (``heads_keys``: the family's head counts that tensor
    parallelism splits) and the sequence (context parallelism)."""
    p = cfg.parallelism
    shape_rules = [  # (key, value, degree key, degree, why)
        ("moe.num_experts", cfg.moe.num_experts, "ep", p.ep, ""),
        *((f"model.{key}", getattr(cfg.model, key), "tp", p.tp, "") for key in heads_keys),
        ("training.seq_len", cfg.training.seq_len, "tp", p.tp, " (sequence parallel splits it)"),
        ("moe.ffn_hidden_size", cfg.moe.ffn_hidden_size, "etp", p.etp, ""),
    ]
    for key, value, degree_key, degree, why in shape_rules:
        if value % degree:
            raise ConfigError(
                f"{key} = {value} is not divisible by parallelism.{degree_key}"
                f" = {degree}{why}; pick degrees that divide it"
            )
    if cfg.model.n_layers < p.pp:
        raise ConfigError(
            f"model.n_layers = {cfg.model.n_layers} is fewer than the "
            f"parallelism.pp = {p.pp} pipeline stages"
        )
    if p.cp > 1:
        check_context_parallel(cfg)


def check_context_parallel(cfg: JobConfig) -> None:
    """cp > 1: the sequence cuts into 2 x cp equal chunks (each rank's part split again by
    tp)."""
    p, seq_len = cfg.parallelism, cfg.training.seq_len
    if seq_len % (2 * p.cp * p.tp):
        raise ConfigError(
            f"training.seq_len = {seq_len} is not divisible by 2 x parallelism.cp x "
            f"parallelism.tp = {2 * p.cp * p.tp} (context parallelism cuts each sequence into "
            "2 x cp chunks, tensor parallelism splits each rank's part); pick a seq_len that is"
        )


def check_activation_checkpoint(ac: ActivationCheckpoint) -> None:
    """Keys of [activation_checkpoint] that contradict the mode or name no known module."""
    modules = ac.recompute_modules
    if modules and ac.mode != "selective":
        raise ConfigError(
            f"activation_checkpoint.recompute_modules = {modules} needs "
            f"activation_checkpoint.mode = 'selective', not {ac.mode!r}"
        )
    _check_names("recompute_modules", modules)
    check_offload_modules(ac)
    if ac.mode == "none" and ac.every_n_layers != 1:
        raise ConfigError(
            f"activation_checkpoint.every_n_layers = {ac.every_n_layers} has no "
            "effect with activation_checkpoint.mode = 'none'; pick full or "
            "selective"
        )
