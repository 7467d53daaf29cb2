"""Named sizes of the Llama family (dense: ``moe.num_experts = 0``), as values of the [model]
and [moe] config sections. Set ``moe.num_experts`` (and the other [moe] keys) to turn the
blocks ``moe.layer_freq`` selects into MoE layers."""

FLAVORS: dict[str, dict[str, dict]] = {
    # Trains at several steps/s on 2 CPU cores.
    "debug": {
        "model": dict(
            vocab_size=4224,
            dim=256,
            n_layers=3,
            n_dense_layers=0,
            n_heads=8,
            n_kv_heads=2,
            head_dim=32,
            inter_dim=768,
            rope_theta=500000.0,
            norm_eps=1e-5,
        ),
        "moe": dict(num_experts=0),
    },
    # Meta-Llama-3-8B (Hugging Face config.json; no RoPE scaling, unlike Llama 3.1).
    "8B": {
        "model": dict(
            vocab_size=128256,
            dim=4096,
            n_layers=32,
            n_dense_layers=0,
            n_heads=32,
            n_kv_heads=8,
            head_dim=128,
            inter_dim=14336,
            rope_theta=500000.0,
            norm_eps=1e-5,
        ),
        "moe": dict(num_experts=0),
    },
}
