"""ParallelDims: parallelism degrees -> validated device meshes.

One world, two views of it (Megatron's "parallel folding"):

- the dense view, dims ``(pp, dp_replicate, dp_shard, cp, tp)``: attention, dense MLPs,
  embeddings; FSDP shards over ``dp_replicate x dp_shard``, TP splits over ``tp``;
- the expert view, dims ``(pp, dp_replicate, edp, ep, etp)``: routed experts; ``ep x etp``
  borrows its ranks from the dense view's ``dp_shard x cp x tp`` block and ``edp`` is what is
  left of that block, over which FSDP shards the experts.

Both views lay ranks out row-major, so the innermost dims (``tp``; ``etp`` then ``ep``) are
neighbouring ranks - inside one node - and ``pp``/``dp_replicate`` span nodes.
"""

import math
from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchmoe.config.errors import ConfigError
from torchmoe.config.schema import JobConfig, Parallelism

DENSE_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EXPERT_DIMS = ("pp", "dp_replicate", "edp", "ep", "etp")
# Degrees this version implements; the others are validated but refused with a clear message.
_AVAILABLE = {"cp": 1}


@dataclass
class Meshes:
    dense: DeviceMesh
    expert: DeviceMesh
    dp: DeviceMesh  # dense dp_replicate x dp_shard flattened: ranks that read different data
    # dense dp_replicate x dp_shard x tp flattened: ranks that route different tokens. FSDP over
    # it shards the modules replicated over tp (router, shared experts) and sums their
    # gradients over tp too.
    dp_tp: DeviceMesh
    # pp x dp_replicate x dp_shard flattened: the ranks whose losses make the global loss
    dp_pp: DeviceMesh

    def dp_mesh(self) -> DeviceMesh:
        """FSDP mesh of dense parameters: 2-D (HSDP) when replicated."""
        if self.dense["dp_replicate"].size() > 1:
            return self.dense["dp_replicate", "dp_shard"]
        return self.dense["dp_shard"]

    def expert_dp_mesh(self) -> DeviceMesh:
        if self.expert["dp_replicate"].size() > 1:
            return self.expert["dp_replicate", "edp"]
        return self.expert["edp"]


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    tp: int
    pp: int
    ep: int
    etp: int
    world_size: int
    meshes: Meshes | None = None  # set by build_meshes when world_size > 1

    @classmethod
    def from_config(cls, p: Parallelism, world_size: int) -> "ParallelDims":
        """Resolve ``dp_shard`` and check that the degrees multiply to the world size.

        ``dp_shard = -1`` takes the ranks left over. An explicit ``dp_shard`` is the dense FSDP
        degree, which ``ep`` borrows from; if instead ``dp_shard x ep`` (times the rest) fills
        the world, ``dp_shard`` is read as the experts' FSDP degree and EP multiplies it:
        "FSDP2 x EP2" on 4 ranks. Either way every rank is used once.
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
        dims = cls(p.dp_replicate, dp_shard, p.cp, p.tp, p.pp, p.ep, p.etp, world_size)
        dims._check_expert_folding()
        return dims

    def _check_expert_folding(self) -> None:
        block = self.dp_shard * self.cp * self.tp
        if block % (self.ep * self.etp):
            raise ConfigError(
                f"parallelism.ep = {self.ep} x parallelism.etp = {self.etp} must divide "
                f"dp_shard x cp x tp = {block}, the ranks expert parallelism borrows from; "
                "on fewer GPUs lower parallelism.ep"
            )

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each reads different batches."""
        return self.dp_replicate * self.dp_shard

    @property
    def edp(self) -> int:
        """Ranks over which FSDP shards each expert (per data-parallel replica)."""
        return self.dp_shard * self.cp * self.tp // (self.ep * self.etp)

    def check_model(self, cfg: JobConfig) -> None:
        """Degrees against the model's shape, then against what this version implements; one
        ConfigError per problem, before anything is allocated."""
        from torchmoe.models.registry import get_model_spec  # the registry imports the plans

        shape_rules = [  # (key, value, degree key, degree, why)
            ("moe.num_experts", cfg.moe.num_experts, "ep", self.ep, ""),
            *(
                (f"model.{key}", getattr(cfg.model, key), "tp", self.tp, "")
                for key in get_model_spec(cfg.model.name).heads_keys
            ),
            (
                "training.seq_len",
                cfg.training.seq_len,
                "tp",
                self.tp,
                " (sequence parallel splits it)",
            ),
            ("moe.ffn_hidden_size", cfg.moe.ffn_hidden_size, "etp", self.etp, ""),
        ]
        for key, value, degree_key, degree, why in shape_rules:
            if value % degree:
                raise ConfigError(
                    f"{key} = {value} is not divisible by parallelism.{degree_key}"
                    f" = {degree}{why}; pick degrees that divide it"
                )
        if cfg.model.n_layers < self.pp:
            raise ConfigError(
                f"model.n_layers = {cfg.model.n_layers} is fewer than the "
                f"parallelism.pp = {self.pp} pipeline stages"
            )
        for key, available in _AVAILABLE.items():
            if getattr(self, key) > available:
                raise ConfigError(
                    f"parallelism.{key} = {getattr(self, key)} is not available "
                    f"yet; use {available}"
                )

    def build_meshes(self, device_type: str) -> None:
        if self.world_size > 1:
            self.meshes = build_meshes(self, device_type)

    def dp_rank(self) -> int:
        """This rank's data shard index in [0, dp)."""
        return self.meshes.dp.get_local_rank() if self.meshes else 0

    def shape(self, names: tuple[str, ...]) -> tuple[int, ...]:
        sizes = {
            "pp": self.pp,
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "cp": self.cp,
            "tp": self.tp,
            "edp": self.edp,
            "ep": self.ep,
            "etp": self.etp,
        }
        return tuple(sizes[n] for n in names)


def build_meshes(dims: ParallelDims, device_type: str) -> Meshes:
    """Both views over the initialised default process group."""
    assert math.prod(dims.shape(DENSE_DIMS)) == dims.world_size == dist.get_world_size()
    dense = init_device_mesh(device_type, dims.shape(DENSE_DIMS), mesh_dim_names=DENSE_DIMS)
    expert = init_device_mesh(device_type, dims.shape(EXPERT_DIMS), mesh_dim_names=EXPERT_DIMS)
    return Meshes(
        dense,
        expert,
        dense["dp_replicate", "dp_shard"]._flatten("dp"),
        dense["dp_replicate", "dp_shard", "tp"]._flatten("dp_tp"),
        dense["pp", "dp_replicate", "dp_shard"]._flatten("dp_pp"),
    )
