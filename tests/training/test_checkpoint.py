"""The engine's checkpoint format: optimiser state without pickle, RNG and generators, pruning, pointer."""

from __future__ import annotations

import pytest
import torch

from respiramfm.errors import CheckpointError
from respiramfm.training import checkpoint as ck


def test_optimizer_state_roundtrips_without_pickle(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad()
    ck.save_checkpoint(tmp_path, 3, model.state_dict(), opt, {"world_size": 1})
    path = ck.latest_checkpoint(tmp_path)
    assert path is not None and path.name == "step_000000003"
    state = ck.load_checkpoint(path, rank=0)
    model2 = torch.nn.Linear(4, 3)
    model2.load_state_dict(state["model"], strict=True)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1.0)
    opt2.load_state_dict(state["optimizer"])
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["lr"] == 1e-3
    x = torch.randn(5, 4)
    for m, o in ((model, opt), (model2, opt2)):
        m(x).pow(2).sum().backward()
        o.step()
    assert torch.equal(model.weight, model2.weight)


def test_checkpoint_pruning_and_missing_pointer(tmp_path):
    assert ck.latest_checkpoint(tmp_path) is None
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    for s in (2, 4, 6):
        ck.save_checkpoint(tmp_path, s, model.state_dict(), opt, {"world_size": 1}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000000004", "step_000000006"]
    assert not list(tmp_path.glob(".tmp-*"))
    with pytest.raises(Exception, match="RNG state for process 1"):
        ck.load_checkpoint(ck.latest_checkpoint(tmp_path), rank=1)


def test_rng_and_generators_roundtrip_and_a_torn_pointer_is_an_error(tmp_path):
    gen = torch.Generator().manual_seed(5)
    torch.manual_seed(11)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    ck.save_checkpoint(tmp_path, 1, model.state_dict(), opt, {"world_size": 1}, generators={"shuffle": gen})
    expected = (torch.rand(3), torch.randperm(10, generator=gen))
    torch.manual_seed(0)
    gen.manual_seed(0)
    state = ck.load_checkpoint(ck.latest_checkpoint(tmp_path), rank=0)
    ck.set_rng_state(state["rng"], {"shuffle": gen})
    assert torch.equal(torch.rand(3), expected[0]) and torch.equal(torch.randperm(10, generator=gen), expected[1])
    with pytest.raises(CheckpointError, match="RNG state"):
        ck.set_rng_state(state["rng"], {"other": gen})
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="pointer"):
        ck.latest_checkpoint(tmp_path)
