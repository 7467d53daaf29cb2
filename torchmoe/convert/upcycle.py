"""Upcycling: the weights of a dense model -> those of an MoE model that computes the same
function at step 0, so fine-tuning starts from the dense model's quality.

Legend (torchmoe/__init__.py): D model dim, F dense hidden dim, E experts, K experts per token.
The derivation below also writes G for the granularity (slices per dense MLP) and R for the
replicas of it: E = R * G experts of hidden dim F / G, K a multiple of G.

Every MoE layer of the target model (decoder blocks and multi-token-prediction blocks alike)
takes the dense MLP at the same place; every other tensor is taken as it is. The dense SwiGLU
``y = W2 (silu(W1 x) * W3 x)`` is elementwise in its hidden dim, so cutting F into G slices of
F / G gives ``y = sum_g y_g`` with ``y_g`` the SwiGLU of slice g (rows of W1, W3; columns of
W2). Expert ``e = r * G + g`` holds slice g of replica r (granularity 1 is plain upcycling:
every expert a copy of the MLP).

Why the output is the dense output: all G experts of replica r get the same router row
``v_r`` (random per replica), hence one logit and one score ``s_r`` (softmax or sigmoid). The
expert bias starts at zero, so the top K = m * G scores are the G equal scores of each of the m
best replicas C: a replica is never split unless two replicas tie exactly. Group-limited
routing keeps this when every group holds whole replicas, and so do Sinkhorn selection (columns
of one replica stay equal) and round-robin (K and E are multiples of G). Renormalising the K
weights and scaling by ``router_topk_scaling_factor`` = a gives expert (r, g) the weight
``a * s_r / (G * sum_{r' in C} s_r') = (a / G) * p_r`` with ``sum_{r in C} p_r = 1`` (a softmax
over the K chosen logits gives the same without renormalising), so the layer outputs
``sum_r (a / G) p_r sum_g y_g = (a / G) y``: ``y`` for a = G. Shared experts would add to
``y`` and capacity limits could drop some slices, so the target must not use them.
"""

import torch

from torchmoe.config.errors import ConfigError
from torchmoe.config.registry import build_model
from torchmoe.config.schema import JobConfig
from torchmoe.models.moe.moe import MoE


def check_upcycling(cfg: JobConfig, granularity: int, dense_hidden: int) -> None:
    """Raise a ConfigError when the MoE config ``cfg`` cannot reproduce a dense MLP of hidden
    size ``dense_hidden`` cut into ``granularity`` slices (see the module docstring)."""
    e, g = cfg.moe, granularity
    if g < 1:
        raise ConfigError(f"granularity = {g} must be >= 1")
    if e.num_experts == 0:
        raise ConfigError("moe.num_experts = 0: the upcycling target must be an MoE config")
    if dense_hidden % g:
        raise ConfigError(f"granularity = {g} must divide the dense hidden size {dense_hidden}")
    renormalised = e.router_norm_topk_prob or (
        e.router_score_function == "softmax" and not e.router_pre_softmax
    )
    per_group = e.num_experts // e.router_num_groups if e.router_num_groups else 0
    rules = [
        (
            e.num_experts % g == 0,
            "moe.num_experts",
            e.num_experts,
            f"a multiple of granularity = {g}",
        ),
        (
            e.ffn_hidden_size * g == dense_hidden,
            "moe.ffn_hidden_size",
            e.ffn_hidden_size,
            f"the dense hidden size {dense_hidden} / granularity {g} = {dense_hidden // g}",
        ),
        (
            e.router_topk % g == 0,
            "moe.router_topk",
            e.router_topk,
            f"a multiple of granularity = {g} (a token takes every slice of a replica)",
        ),
        (
            renormalised,
            "moe.router_norm_topk_prob",
            "false",
            "true (or moe.router_pre_softmax = false with softmax scores)",
        ),
        (
            e.router_topk_scaling_factor == g,
            "moe.router_topk_scaling_factor",
            e.router_topk_scaling_factor,
            f"granularity = {g}",
        ),
        (
            e.shared_expert_intermediate_size == 0,
            "moe.shared_expert_intermediate_size",
            e.shared_expert_intermediate_size,
            "0 (shared experts would add to the dense output)",
        ),
        (
            per_group % g == 0,
            "moe.router_num_groups",
            e.router_num_groups,
            f"0 or leave groups of whole replicas ({per_group} experts per group is not a "
            f"multiple of granularity = {g})",
        ),
        (
            e.capacity_factor == 0,
            "moe.capacity_factor",
            e.capacity_factor,
            "0 (dropped copies would skip part of the MLP)",
        ),
    ]
    for ok, key, value, want in rules:
        if not ok:
            raise ConfigError(f"{key} = {value} must be {want} to upcycle a dense model")


def upcycle_state_dict(
    dense: dict[str, torch.Tensor], cfg: JobConfig, granularity: int = 1
) -> dict[str, torch.Tensor]:
    """The state dict of the model ``cfg`` describes, from the dense model's ``dense`` (both
    with torchmoe parameter names). Router rows are drawn with std ``model.init_std`` from seed
    ``training.seed``; expert biases start at zero. Tensors outside MoE layers are shared with
    ``dense``, not copied in memory. The result has exactly the target model's names and
    shapes, or a ConfigError says which differs."""
    with torch.device("meta"):
        target = build_model(cfg)
    prefixes = tuple(f"{name}." for name, m in target.named_modules() if isinstance(m, MoE))
    if any(".router." in name for name in dense):
        raise ConfigError(
            "the dense checkpoint already has routers; upcycle a model trained "
            "with moe.num_experts = 0"
        )
    for prefix in prefixes:
        if f"{prefix}w1.weight" not in dense:
            raise ConfigError(
                f"the dense checkpoint has no MLP {prefix}w1.weight where the MoE "
                "model has an MoE layer; use the dense model's [model] keys"
            )
    dense_hidden = dense[f"{prefixes[0]}w1.weight"].shape[0] if prefixes else 0
    check_upcycling(cfg, granularity, dense_hidden)

    generator = torch.Generator().manual_seed(cfg.training.seed)
    out = {name: t for name, t in dense.items() if not name.startswith(prefixes)}
    for prefix in prefixes:
        out.update(_upcycle_mlp(dense, prefix, cfg, granularity, generator))
    _check_fits(out, target.state_dict())
    return out


def _upcycle_mlp(
    dense: dict[str, torch.Tensor], prefix: str, cfg: JobConfig, g: int, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """One dense MLP -> the state of one MoE layer, laid out as the module docstring says."""
    w1_FD, w3_FD, w2_DF = (dense[f"{prefix}{w}.weight"] for w in ("w1", "w3", "w2"))
    F, D = w1_FD.shape
    r = cfg.moe.num_experts // g
    # one random router row per replica: [r, D]
    router_rows = torch.randn(r, D, generator=generator, dtype=torch.float64) * cfg.model.init_std
    state = {
        f"{prefix}experts.w13": torch.stack([w1_FD, w3_FD])
        .reshape(2, g, F // g, D)
        .transpose(0, 1)
        .repeat(r, 1, 1, 1),
        f"{prefix}experts.w2": w2_DF.reshape(D, g, F // g).transpose(0, 1).repeat(r, 1, 1),
        f"{prefix}router.gate.weight": router_rows.to(w1_FD.dtype).repeat_interleave(g, dim=0),
    }
    if cfg.moe.enable_expert_bias:
        state[f"{prefix}router.expert_bias"] = torch.zeros(cfg.moe.num_experts)
    return state


def _check_fits(state: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    """Other [model] keys or another family than the dense model's show up here."""
    missing, extra = sorted(want.keys() - state.keys()), sorted(state.keys() - want.keys())
    if missing:
        raise ConfigError(
            f"the MoE model needs {missing[0]}, which the dense checkpoint lacks; "
            "use the dense model's family and [model] keys"
        )
    if extra:
        raise ConfigError(
            f"the dense checkpoint's {extra[0]} has no place in the MoE model; "
            "use the dense model's family and [model] keys"
        )
    wrong = [name for name, t in want.items() if state[name].shape != t.shape]
    if wrong:
        raise ConfigError(
            f"{wrong[0]} has shape {tuple(state[wrong[0]].shape)} in the dense "
            f"checkpoint but {tuple(want[wrong[0]].shape)} in the MoE model; use "
            "the dense model's [model] keys"
        )
