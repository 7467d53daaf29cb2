"""The experts' joined gate and up (``w13`` [E, 2, F, D]) map to two Hugging Face tensors per
expert, and back; a stack with a part missing is refused rather than left unfilled."""

import pytest
import torch

from torchmoe.config.errors import ConfigError
from torchmoe.convert.hf import adapter_for_family
from torchmoe.convert.hf.convert import _meta_state
from torchmoe.convert.hf.mapping import from_hf, is_expert_stack, to_hf
from torchmoe.convert.hf.rules import ffn_rules

E, F, D = 3, 5, 4
RULES = ffn_rules()
OURS = "layers.1.feed_forward.experts."
HF = "model.layers.1.mlp.experts."


def ours() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        OURS + "w13": torch.randn(E, 2, F, D, generator=g),
        OURS + "w2": torch.randn(E, D, F, generator=g),
    }


def test_gate_and_up_are_the_halves_and_come_back_whole():
    state = ours()
    hf = to_hf(state, RULES, "deepseek_v3")
    assert len(hf) == 3 * E
    for e in range(E):
        assert torch.equal(hf[f"{HF}{e}.gate_proj.weight"], state[OURS + "w13"][e, 0])
        assert torch.equal(hf[f"{HF}{e}.up_proj.weight"], state[OURS + "w13"][e, 1])
        assert torch.equal(hf[f"{HF}{e}.down_proj.weight"], state[OURS + "w2"][e])
    back = from_hf(hf, RULES)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(back[name], t), name
    assert is_expert_stack(OURS + "w13", RULES)


def test_a_slice_of_the_stack_exports_from_its_first_expert():
    w13 = ours()[OURS + "w13"]
    hf = to_hf({OURS + "w13": w13[1:2]}, RULES, "deepseek_v3", first_expert=1)
    assert sorted(hf) == [f"{HF}1.gate_proj.weight", f"{HF}1.up_proj.weight"]
    assert torch.equal(hf[f"{HF}1.up_proj.weight"], w13[1, 1])


@pytest.mark.parametrize(
    "dropped,message",
    [
        (["2.up_proj"], r"experts.w13 are incomplete: .*experts.2.up_proj.weight is missing"),
        ([f"{e}.up_proj" for e in range(E)], r"experts.0.up_proj.weight is missing"),
        ([f"1.{p}_proj" for p in ("gate", "up")], r"incomplete: expert 1 is missing"),
    ],
)
def test_a_stack_with_a_part_missing_is_refused(dropped, message):
    hf = to_hf(ours(), RULES, "deepseek_v3")
    for name in dropped:
        del hf[f"{HF}{name}.weight"]
    with pytest.raises(ConfigError, match=message):
        from_hf(hf, RULES)


def test_every_family_exports_each_expert_as_gate_up_and_down(tiny_config):
    """Including the experts of DeepSeek-V3's MTP blocks, whose rules are the block rules
    moved to other names (a moved rule must keep its part)."""
    for family, extra in (
        ("deepseek_v3", {"model.mtp_num_layers": 1}),
        ("deepseek_v2", {}),
        ("mixtral", {"moe.shared_expert_intermediate_size": 0}),
        ("qwen3_moe", {"moe.shared_expert_intermediate_size": 0}),
    ):
        cfg = tiny_config(**{"model.name": family, **extra})
        adapter = adapter_for_family(family)
        _, meta = _meta_state(cfg)
        stacks = [n for n in meta if n.endswith("experts.w13")]
        assert any(n.startswith("mtp.") for n in stacks) == ("mtp_num_layers" in str(extra))
        state = {n: torch.randn(t.shape) for n, t in meta.items() if n in stacks}
        hf = to_hf(state, adapter.rules(cfg, {}), family)
        experts = cfg.moe.num_experts
        assert len(hf) == 2 * experts * len(stacks), family
        assert all(t.dim() == 2 for t in hf.values()), family
        back = from_hf(hf, adapter.rules(cfg, {}))
        assert back.keys() == state.keys()
        assert all(torch.equal(back[n], t) for n, t in state.items()), family
