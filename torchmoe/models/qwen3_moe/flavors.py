"""Named sizes of the Qwen3-MoE family, as values of the [model] and [moe] config sections.

Real sizes are those of the Hugging Face config.json of Qwen/Qwen3-30B-A3B and
Qwen/Qwen3-235B-A22B (``decoder_sparse_step`` 1 and no ``mlp_only_layers``: every block is
MoE; ``intermediate_size`` is kept as ``inter_dim`` for blocks a user makes dense).
"""

_QWEN3_MOE = dict(
    num_experts=128,
    router_topk=8,
    shared_expert_intermediate_size=0,
    router_score_function="softmax",
    router_pre_softmax=True,
    router_norm_topk_prob=True,
    router_topk_scaling_factor=1.0,
    router_num_groups=0,
    router_group_topk=0,
    load_balancing_type=["aux_loss"],
    aux_loss_coeff=[1e-3],
    enable_expert_bias=False,
)

FLAVORS: dict[str, dict[str, dict]] = {
    # Trains at several steps/s on 2 CPU cores; fine-grained experts like the real sizes.
    "debug": {
        "model": dict(
            vocab_size=4224,
            dim=256,
            n_layers=3,
            n_dense_layers=0,
            n_heads=8,
            n_kv_heads=2,
            head_dim=32,
            inter_dim=512,
            rope_theta=1e6,
            norm_eps=1e-6,
        ),
        "moe": dict(_QWEN3_MOE, num_experts=16, router_topk=4, ffn_hidden_size=64),
    },
    "30B-A3B": {
        "model": dict(
            vocab_size=151936,
            dim=2048,
            n_layers=48,
            n_dense_layers=0,
            n_heads=32,
            n_kv_heads=4,
            head_dim=128,
            inter_dim=6144,
            rope_theta=1e6,
            norm_eps=1e-6,
        ),
        "moe": dict(_QWEN3_MOE, ffn_hidden_size=768),
    },
    "235B-A22B": {
        "model": dict(
            vocab_size=151936,
            dim=4096,
            n_layers=94,
            n_dense_layers=0,
            n_heads=64,
            n_kv_heads=4,
            head_dim=128,
            inter_dim=12288,
            rope_theta=1e6,
            norm_eps=1e-6,
        ),
        "moe": dict(_QWEN3_MOE, ffn_hidden_size=1536),
    },
}
