"""Named sizes of the DeepSeek-V2 family, built by the DeepSeek-V3 builder (MLA, shared
experts): the architecture is the same, only the balancing differs. V2 routes with a softmax
over all experts, keeps the top-k weights unnormalised and balances with a per-sequence
auxiliary loss (Hugging Face config.json of deepseek-ai/DeepSeek-V2-Lite: ``seq_aux`` true,
``aux_loss_alpha`` 0.001, no expert bias).
"""

from torchmoe.models.deepseek_v3.flavors import FLAVORS as DEEPSEEK_V3_FLAVORS

_V2_BALANCING = dict(
    load_balancing_type=["seq_aux_loss"], aux_loss_coeff=[1e-3], enable_expert_bias=False
)

FLAVORS: dict[str, dict[str, dict]] = {
    # Trains at several steps/s on 2 CPU cores: 8 experts top-2 plus 2 shared, V2 routing.
    "debug": {
        "model": dict(DEEPSEEK_V3_FLAVORS["debug"]["model"]),
        "moe": dict(
            num_experts=8,
            router_topk=2,
            ffn_hidden_size=128,
            shared_expert_intermediate_size=256,
            router_score_function="softmax",
            router_norm_topk_prob=False,
            router_topk_scaling_factor=1.0,
            router_num_groups=0,
            router_group_topk=0,
            **_V2_BALANCING,
        ),
    },
    # DeepSeek-V2-Lite: the sizes of DeepSeek-V3's "16B" flavor (dim 2048, 27 layers, the
    # first dense, MLA without query compression, 64 experts top-6 plus 2 shared, YaRN x40).
    "lite": {
        "model": dict(DEEPSEEK_V3_FLAVORS["16B"]["model"]),
        "moe": dict(DEEPSEEK_V3_FLAVORS["16B"]["moe"], **_V2_BALANCING),
    },
}
