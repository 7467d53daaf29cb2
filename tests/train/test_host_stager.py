"""The async checkpoints' staging copy: a snapshot that later training cannot change, in host
buffers reused from one save to the next. Its DTensor path runs in
test_preemption.py::test_async_saves_on_two_ranks_verify_and_resume_exactly (FSDP shards)."""

from collections import OrderedDict

import torch

from torchmoe.train.host_stager import HostStager


def test_the_staged_copy_is_a_snapshot_in_reused_buffers():
    weight = torch.randn(4, 3)
    state = {"model": OrderedDict(w=weight), "step": 7, "blob": b"{}", "betas": (0.9, 0.95)}
    stager = HostStager(pin_memory=False)
    first = stager.stage(state)
    expected = weight.clone()
    weight.add_(1.0)  # training goes on
    assert torch.equal(first["model"]["w"], expected)
    assert isinstance(first["model"], OrderedDict) and first["betas"] == (0.9, 0.95)
    assert first["step"] == 7 and first["blob"] == b"{}"
    second = stager.stage(state)
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()  # one allocation
    assert torch.equal(second["model"]["w"], weight)
    stager.close()
    assert not stager.buffers
