"""Named sizes of the DeepSeek-V3 family, as values of the [model] and [moe] config sections.

A flavor fills every key the recipe and command line leave unset.
"""

FLAVORS: dict[str, dict[str, dict]] = {
    # Trains at several steps/s on 2 CPU cores; exercises every router feature.
    "debug": {
        "model": dict(vocab_size=4224, dim=256, n_layers=3, n_dense_layers=1, n_heads=4,
                      inter_dim=512, q_lora_rank=0, kv_lora_rank=64, qk_nope_head_dim=32,
                      qk_rope_head_dim=16, v_head_dim=32, rope_factor=1.0),
        "moe": dict(num_experts=8, router_topk=2, ffn_hidden_size=128,
                    shared_expert_intermediate_size=128, router_score_function="sigmoid",
                    router_norm_topk_prob=True, router_topk_scaling_factor=1.0,
                    router_num_groups=4, router_group_topk=2,
                    load_balancing_type=["seq_aux_loss"], aux_loss_coeff=[1e-3],
                    enable_expert_bias=True),
    },
    # DeepSeek-MoE-16B / DeepSeek-V2-Lite sizes.
    "16B": {
        "model": dict(vocab_size=102400, dim=2048, n_layers=27, n_dense_layers=1, n_heads=16,
                      inter_dim=10944, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                      qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0, rope_factor=40.0,
                      rope_original_seq_len=4096, rope_beta_fast=32.0, rope_beta_slow=1.0,
                      rope_mscale=0.707),
        "moe": dict(num_experts=64, router_topk=6, ffn_hidden_size=1408,
                    shared_expert_intermediate_size=2816, router_score_function="softmax",
                    router_norm_topk_prob=False, router_topk_scaling_factor=1.0,
                    router_num_groups=0, router_group_topk=0, load_balancing_type=["none"],
                    aux_loss_coeff=[0.0], enable_expert_bias=True),
    },
    # DeepSeek-V3 (671B total, 37B active).
    "671B": {
        "model": dict(vocab_size=129280, dim=7168, n_layers=61, n_dense_layers=3, n_heads=128,
                      inter_dim=18432, q_lora_rank=1536, kv_lora_rank=512,
                      qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                      rope_theta=10000.0, rope_factor=40.0, rope_original_seq_len=4096,
                      rope_beta_fast=32.0, rope_beta_slow=1.0, rope_mscale=1.0),
        "moe": dict(num_experts=256, router_topk=8, ffn_hidden_size=2048,
                    shared_expert_intermediate_size=2048, router_score_function="sigmoid",
                    router_norm_topk_prob=True, router_topk_scaling_factor=2.5,
                    router_num_groups=8, router_group_topk=4,
                    load_balancing_type=["seq_aux_loss"], aux_loss_coeff=[1e-4],
                    enable_expert_bias=True),
    },
}
