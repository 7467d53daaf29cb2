"""Named sizes of the Mixtral family, as values of the [model] and [moe] config sections."""

_MIXTRAL_MOE = dict(
    router_topk=2,
    num_experts=8,
    shared_expert_intermediate_size=0,
    router_score_function="softmax",
    router_norm_topk_prob=True,
    router_topk_scaling_factor=1.0,
    router_num_groups=0,
    router_group_topk=0,
    load_balancing_type=["aux_loss"],
    aux_loss_coeff=[1e-2],
    enable_expert_bias=False,
)

FLAVORS: dict[str, dict[str, dict]] = {
    "debug": {
        "model": dict(
            vocab_size=4224,
            dim=256,
            n_layers=3,
            n_dense_layers=0,
            n_heads=8,
            n_kv_heads=2,
            head_dim=32,
            rope_theta=1e6,
            norm_eps=1e-5,
        ),
        "moe": dict(_MIXTRAL_MOE, ffn_hidden_size=256),
    },
    "8x7B": {
        "model": dict(
            vocab_size=32000,
            dim=4096,
            n_layers=32,
            n_dense_layers=0,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            rope_theta=1e6,
            norm_eps=1e-5,
        ),
        "moe": dict(_MIXTRAL_MOE, ffn_hidden_size=14336),
    },
    "8x22B": {
        "model": dict(
            vocab_size=32768,
            dim=6144,
            n_layers=56,
            n_dense_layers=0,
            n_heads=48,
            n_kv_heads=8,
            head_dim=128,
            rope_theta=1e6,
            norm_eps=1e-5,
        ),
        "moe": dict(_MIXTRAL_MOE, ffn_hidden_size=16384),
    },
}
