"""Projector architecture, strict save/load, and import of an official state_dict."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from respiramfm.models.configuration import ProjectorConfig
from respiramfm.models.projector import (
    build_projector,
    load_projector,
    official_parameter_count,
    projector_from_official_state_dict,
    read_projector_json,
    save_projector,
)
from respiramfm.errors import CheckpointError, ConfigError


def test_official_architecture_and_parameter_count():
    m = build_projector(ProjectorConfig(out_dim=2560, final="official"))
    kinds = [type(x).__name__ for x in m.projector]
    assert kinds == ["Linear", "LayerNorm", "ReLU", "Dropout", "Linear", "LayerNorm", "ReLU"]
    assert m.num_parameters() == official_parameter_count() == 3_418_624
    assert m.projector[3].p == 0.1


def test_final_heads():
    torch.manual_seed(0)
    x = torch.randn(64, 32)
    outs = {}
    for final in ("official", "layernorm", "none"):
        torch.manual_seed(1)
        m = build_projector(ProjectorConfig(in_dim=32, hidden=48, out_dim=24, final=final)).eval()
        outs[final] = m(x)
    assert (outs["official"] >= 0).all()                  # LN + ReLU: non-negative
    assert (outs["layernorm"] < 0).any()                   # signed
    torch.testing.assert_close(outs["layernorm"].mean(dim=1), torch.zeros(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(outs["official"], outs["layernorm"].clamp(min=0))  # same init, same weights
    lin = build_projector(ProjectorConfig(kind="linear", in_dim=32, out_dim=24, final="none"))
    assert [type(x).__name__ for x in lin.projector] == ["Linear"]


@pytest.mark.parametrize("bad", [dict(kind="conv"), dict(final="tanh"), dict(in_dim=0), dict(dropout=1.0)])
def test_bad_configs(bad):
    with pytest.raises(ConfigError):
        build_projector(ProjectorConfig(**dict(dict(out_dim=8), **bad)))
    with pytest.raises(ConfigError):
        build_projector(ProjectorConfig())            # out_dim unset


def test_save_load_roundtrip_is_exact(tmp_path):
    torch.manual_seed(0)
    cfg = ProjectorConfig(in_dim=16, hidden=24, out_dim=12, final="none", dropout=0.2)
    m = build_projector(cfg)
    save_projector(m, tmp_path, provenance={"text_space": "hidden_mean"})
    m2, cfg2 = load_projector(tmp_path / "projector.safetensors")
    assert cfg2 == cfg and not m2.training
    x = torch.randn(5, 16)
    torch.testing.assert_close(m.eval()(x), m2(x), rtol=0, atol=0)
    assert read_projector_json(tmp_path)["provenance"] == {"text_space": "hidden_mean"}


def test_load_is_strict(tmp_path):
    m = build_projector(ProjectorConfig(in_dim=16, hidden=24, out_dim=12))
    save_projector(m, tmp_path)
    w = tmp_path / "projector.safetensors"
    meta = {"format": "respiramfm.projector", "version": "1"}
    state = load_file(w)
    # unexpected key
    save_file(dict(state, extra=torch.zeros(1)), w, metadata=meta)
    with pytest.raises(CheckpointError, match="unexpected"):
        load_projector(tmp_path)
    # missing key
    save_file({k: v for k, v in state.items() if not k.startswith("projector.5")}, w, metadata=meta)
    with pytest.raises(CheckpointError, match="missing"):
        load_projector(tmp_path)
    # wrong shape
    save_file(dict(state, **{"projector.4.bias": torch.zeros(13)}), w, metadata=meta)
    with pytest.raises(CheckpointError, match="shape"):
        load_projector(tmp_path)
    # non-finite
    bad = dict(state)
    bad["projector.0.bias"] = bad["projector.0.bias"].clone()
    bad["projector.0.bias"][0] = float("nan")
    save_file(bad, w, metadata=meta)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_projector(tmp_path)
    # config JSON disagreeing with the weights' embedded config
    save_projector(m, tmp_path)
    info = json.loads((tmp_path / "projector.json").read_text())
    info["config"]["hidden"] = 25
    (tmp_path / "projector.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="different config"):
        load_projector(tmp_path)
    (tmp_path / "projector.json").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        load_projector(tmp_path)
    w.write_bytes(b"garbage")
    (tmp_path / "projector.json").write_text(json.dumps({"format": "respiramfm.projector", "version": 1,
                                                        "config": {"in_dim": 16, "hidden": 24, "out_dim": 12}}))
    with pytest.raises(CheckpointError, match="unreadable"):
        load_projector(tmp_path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_official_state_dict_loads_strictly(tmp_path):
    """A state_dict shaped like the official ContrastiveProjectionHead (torch.save) loads key for key."""
    torch.manual_seed(0)
    ref = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.LayerNorm(24), torch.nn.ReLU(), torch.nn.Dropout(0.1),
                              torch.nn.Linear(24, 10), torch.nn.LayerNorm(10), torch.nn.ReLU())
    holder = torch.nn.Module()
    holder.projector = ref
    torch.save(holder.state_dict(), tmp_path / "official.pth")
    m, cfg = projector_from_official_state_dict(tmp_path / "official.pth")
    assert (cfg.in_dim, cfg.hidden, cfg.out_dim, cfg.final) == (16, 24, 10, "official")
    x = torch.randn(3, 16)
    torch.testing.assert_close(m(x), holder.eval().projector(x), rtol=0, atol=0)
    torch.save({"projector.0.weight": torch.zeros(24, 16)}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError):
        projector_from_official_state_dict(tmp_path / "partial.pth")
    (tmp_path / "pickle.pth").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(CheckpointError):
        projector_from_official_state_dict(tmp_path / "pickle.pth")
