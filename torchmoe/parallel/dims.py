"""ParallelDims: parallelism degrees -> validated device meshes.

One world, two views of it (Megatron's "parallel folding"):

- the dense view, dims ``(pp, dp_replicate, dp_shard, cp, tp)``: attention, dense MLPs,
  embeddings; FSDP shards over ``dp_replicate x dp_shard`` (x ``cp``: context-parallel ranks
  hold the same weights), TP splits over ``tp``;
- the expert view, dims ``(pp, dp_replicate, edp, ep, etp)``: routed experts; ``ep x etp``
  borrows its ranks from the dense view's ``dp_shard x cp x tp`` block and ``edp`` is what is
  left of that block, over which FSDP shards the experts.

Both views lay ranks out row-major, so the innermost dims (``tp``; ``etp`` then ``ep``) are
neighbouring ranks - inside one node - and ``pp``/``dp_replicate`` span nodes.
"""

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from torchmoe.config.parallel_checks import resolve_dp_shard
from torchmoe.config.schema import Parallelism

DENSE_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EXPERT_DIMS = ("pp", "dp_replicate", "edp", "ep", "etp")


@dataclass
class Meshes:
    dense: DeviceMesh
    expert: DeviceMesh
    dp: DeviceMesh  # dense dp_replicate x dp_shard flattened: ranks that read different data
    # dense dp_replicate x dp_shard x cp x tp flattened: ranks that route different tokens. FSDP
    # over it shards the modules replicated over tp (router, shared experts) and sums their
    # gradients over cp and tp too.
    tokens: DeviceMesh
    # dense cp x tp flattened: the ranks holding other parts of the same sequences (context
    # chunks, tensor-parallel sequence shards)
    sequence: DeviceMesh
    # pp x dp_replicate x dp_shard x cp flattened: the ranks whose losses make the global loss
    # (context-parallel ranks each hold the loss of their chunks)
    loss: DeviceMesh
    # dp_shard x cp flattened: FSDP's mesh under context parallelism (cp ranks hold the same
    # weights and sum their gradients)
    dp_shard_cp: DeviceMesh

    def dp_mesh(self) -> DeviceMesh:
        """FSDP mesh of dense parameters: dp_shard, x cp under context parallelism; 2-D (HSDP)
        when replicated."""
        replicated = self.dense["dp_replicate"].size() > 1
        if self.dense["cp"].size() == 1:
            return self.dense["dp_replicate", "dp_shard"] if replicated else self.dense["dp_shard"]
        if not replicated:
            return self.dp_shard_cp
        # replicate x (dp_shard x cp), 2-D. torch 2.13 joins two meshes of one root; older
        # torch slices the flattened dim out of the root (deprecated in 2.13)
        concatenate = getattr(DeviceMesh, "_concatenate", None)
        if concatenate is None:
            return self.dense["dp_replicate", "dp_shard_cp"]
        return concatenate([self.dense["dp_replicate"], self.dp_shard_cp])

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
        """The degrees of ``p`` on ``world_size`` ranks (``dp_shard`` resolved as
        config/parallel_checks.py reads it; a ConfigError when they do not fill the world)."""
        dp_shard = resolve_dp_shard(p, world_size)
        return cls(p.dp_replicate, dp_shard, p.cp, p.tp, p.pp, p.ep, p.etp, world_size)

    def describe(self, p: Parallelism) -> str:
        """The degrees as the config gave them, then what they resolved to: ``dp_shard 2
        ep 2`` on 4 ranks is a dense FSDP degree of 4."""
        given = " ".join(
            f"{k} {getattr(p, k)}" + (" (the rest)" if k == "dp_shard" and p.dp_shard == -1 else "")
            for k in ("dp_replicate", "dp_shard", "cp", "tp", "pp", "ep", "etp")
        )
        return (
            f"{self.world_size} ranks: given {given}; resolved: data-parallel {self.dp} "
            f"(replicate {self.dp_replicate} x dense FSDP {self.dp_shard}"
            + (f", FSDP over dp_shard x cp {self.dp_shard * self.cp}" if self.cp > 1 else "")
            + "), experts over "
            f"ep {self.ep} x etp {self.etp} with FSDP {self.edp}"
        )

    @property
    def dp(self) -> int:
        """Data-parallel ranks: each reads different batches."""
        return self.dp_replicate * self.dp_shard

    @property
    def edp(self) -> int:
        """Ranks over which FSDP shards each expert (per data-parallel replica)."""
        return self.dp_shard * self.cp * self.tp // (self.ep * self.etp)

    @property
    def fsdp_enabled(self) -> bool:
        """The plan shards with FSDP2: more than one rank per pipeline stage (data-parallel or
        tensor-parallel ranks; with tp alone FSDP runs on a size-1 data mesh to shard the
        per-token modules over tp)."""
        return self.world_size // self.pp > 1

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def ep_enabled(self) -> bool:
        """Experts are split over ranks: expert or expert-tensor parallelism."""
        return self.ep * self.etp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        """Ranks read different batches."""
        return self.dp > 1

    @property
    def experts_split(self) -> bool:
        """Experts' FSDP mesh differs from the dense one: split over ep/etp or replicated
        over tp."""
        return self.ep * self.etp * self.tp > 1

    def mixed_precision(self, dtype: torch.dtype) -> str:
        """Who runs compute in ``dtype``: "fsdp" (its mixed-precision policy casts the
        parameters) whenever FSDP is on, else "autocast"; "none" for float32. Never both."""
        if dtype == torch.float32:
            return "none"
        return "fsdp" if self.fsdp_enabled else "autocast"

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
        dense["dp_replicate", "dp_shard", "cp", "tp"]._flatten("tokens"),
        dense["cp", "tp"]._flatten("sequence"),
        dense["pp", "dp_replicate", "dp_shard", "cp"]._flatten("loss"),
        dense["dp_shard", "cp"]._flatten("dp_shard_cp"),
    )
