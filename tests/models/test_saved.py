"""One model directory: exact round trip, strict refusal of anything tampered, atomic replacement."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from respiramfm.models.configuration import EncoderInfo, FusionConfig, LoraSettings, ProjectorConfig
from respiramfm.models.projector import build_projector
from respiramfm.errors import CheckpointError, ConfigError
from respiramfm.models.fusion import RespiraMFM
from respiramfm.models.saved import read_config
from respiramfm.models.sequence import FusionItem


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

IN_DIM = 16


def build(arch: str = "llama", seed: int = 0, **kw) -> RespiraMFM:
    torch.manual_seed(seed)
    proj = build_projector(ProjectorConfig(in_dim=IN_DIM, hidden=32, out_dim=64))
    enc = EncoderInfo(name="opera-ct", checkpoint="encoder.safetensors", weights_hash="ab" * 32, out_dim=IN_DIM,
                      frontend={"sr": 16000, "input_sec": 8.0})
    model = RespiraMFM(FusionConfig(backbone=f"tiny-{arch}", encoder=enc, **kw), proj,
                       projector_provenance={"stage1": "unit-test"})
    with torch.no_grad():  # a "trained" state: non-zero LoRA B and a random head
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.2)
    return model


def items() -> list[FusionItem]:
    rng = np.random.default_rng(0)
    return [FusionItem(task="T4", audio=rng.standard_normal(IN_DIM).astype(np.float32),
                       context="Gender: male. Age: 70. Smoking status: smoker."),
            FusionItem(task="T1", audio=None, context="Patient presents with no obvious respiratory symptoms."),
            FusionItem(task="T7", audio=rng.standard_normal(IN_DIM).astype(np.float32), context="")]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = build("llama")
    d = model.save_pretrained(tmp_path_factory.mktemp("m") / "model", extra={"val_auroc": 0.5})
    return model, d


def copy_dir(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_round_trip_gives_identical_predictions(arch, tmp_path):
    model = build(arch)
    before = model.predict_proba(items())
    d = model.save_pretrained(tmp_path / "m")
    loaded = RespiraMFM.from_pretrained(d)
    np.testing.assert_array_equal(loaded.predict_proba(items()), before)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    files = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())
    assert files == ["adapter/adapter_config.json", "adapter/adapter_model.safetensors", "config.json",
                     "head.safetensors", "projector.json", "projector.safetensors"]  # no pickles, no base LLM


def test_config_records_everything(saved):
    model, d = saved
    info = read_config(d)
    assert info["labels"] == {"0": "absent", "1": "present"}
    assert info["backbone"]["name"] == "tiny-llama" and info["backbone"]["weights"].startswith("state-sha256:")
    assert info["backbone"]["tokenizer"].startswith("sha256:")
    assert info["lora"]["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert info["lora"]["settings"]["r"] == 16 and info["lora"]["settings"]["alpha"] == 32
    assert info["projector"]["config"]["in_dim"] == IN_DIM and info["projector"]["frozen"] is True
    assert info["encoder"]["weights_hash"] == "ab" * 32 and info["frontend"]["sr"] == 16000
    assert {"T1", "T4", "T9"} <= set(info["tasks"]) and info["tasks"]["T4"]["disease"] == "COPD"
    assert info["training"] == {"val_auroc": 0.5}
    assert info["package_version"]
    assert set(info["tensors"]["head"]) == {"weight", "bias"}
    assert len(info["tensors"]["adapter"]) == 2 * len(model.lora_modules())
    assert set(info["files"]) == {"adapter/adapter_model.safetensors", "head.safetensors", "projector.safetensors"}
    loaded = RespiraMFM.from_pretrained(d)
    assert loaded.cfg == model.cfg and loaded.tasks["T4"] == model.tasks["T4"]


def _edit_tensors(path: Path, fn) -> None:
    state = load_file(str(path))
    fn(state)
    save_file(state, str(path))


def _load_error(d: Path) -> str:
    with pytest.raises(CheckpointError) as exc:
        RespiraMFM.from_pretrained(d)
    return str(exc.value)


def test_missing_adapter_tensor_is_refused(saved, tmp_path):
    d = copy_dir(saved[1], tmp_path / "m")
    state = load_file(str(d / "adapter/adapter_model.safetensors"))
    gone = sorted(state)[0]
    _edit_tensors(d / "adapter/adapter_model.safetensors", lambda s: s.pop(gone))
    msg = _load_error(d)
    assert f"missing tensor {gone}" in msg and str(d) in msg


def test_extra_adapter_tensor_is_refused(saved, tmp_path):
    d = copy_dir(saved[1], tmp_path / "m")
    _edit_tensors(d / "adapter/adapter_model.safetensors",
                  lambda s: s.update({"base_model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(16, 64)}))
    assert "unexpected tensor base_model.model.layers.9.self_attn.q_proj.lora_A.weight" in _load_error(d)


def test_wrong_shapes_are_refused(saved, tmp_path):
    d = copy_dir(saved[1], tmp_path / "m")
    _edit_tensors(d / "head.safetensors", lambda s: s.update(weight=torch.zeros(3, 64), bias=torch.zeros(3)))
    key = next(iter(load_file(str(d / "adapter/adapter_model.safetensors"))))
    _edit_tensors(d / "adapter/adapter_model.safetensors", lambda s: s.update({key: torch.zeros(8, 8)}))
    msg = _load_error(d)  # every problem is listed at once
    assert "head: weight has shape (3, 64), expected (2, 64)" in msg
    assert "head: bias has shape (3,), expected (2,)" in msg
    assert f"adapter: {key} has shape (8, 8)" in msg


def test_missing_files_and_changed_values_are_refused(saved, tmp_path):
    d = copy_dir(saved[1], tmp_path / "a")
    (d / "head.safetensors").unlink()
    assert "head.safetensors is missing" in _load_error(d)
    d = copy_dir(saved[1], tmp_path / "b")
    (d / "adapter/adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors is missing" in _load_error(d)
    d = copy_dir(saved[1], tmp_path / "c")
    _edit_tensors(d / "head.safetensors", lambda s: s.update(bias=s["bias"] + 1.0))  # same shape, new values
    assert "head.safetensors: content differs from the sha256" in _load_error(d)
    d = copy_dir(saved[1], tmp_path / "d")
    _edit_tensors(d / "projector.safetensors", lambda s: s.pop("projector.0.bias"))
    assert "projector.0.bias" in _load_error(d)


def test_config_tampering_is_refused(saved, tmp_path):
    d = copy_dir(saved[1], tmp_path / "a")
    info = json.loads((d / "config.json").read_text())
    info["fusion"]["tiny"] = {"seed": 1}  # a different base LLM than the one trained on
    (d / "config.json").write_text(json.dumps(info))
    assert "base LLM differs" in _load_error(d)
    d = copy_dir(saved[1], tmp_path / "b")
    info = json.loads((d / "config.json").read_text())
    info["fusion"]["lora"]["r"] = 8  # config and adapter disagree
    (d / "config.json").write_text(json.dumps(info))
    msg = _load_error(d)
    assert "r is 16, the model config says 8" in msg and "has shape" in msg
    d = copy_dir(saved[1], tmp_path / "c")
    (d / "config.json").write_text("{not json")
    assert "not valid JSON" in _load_error(d)
    assert "not found" in _load_error(tmp_path / "nowhere")
    d = copy_dir(saved[1], tmp_path / "e")
    info = json.loads((d / "config.json").read_text())
    info["fusion"]["bogus"] = 1
    (d / "config.json").write_text(json.dumps(info))
    assert "bogus" in _load_error(d)


def test_save_is_atomic_and_replaces_only_models(saved, tmp_path, monkeypatch):
    model, _ = saved
    target = model.save_pretrained(tmp_path / "m")
    before = {p.name: p.read_bytes() for p in target.glob("*.safetensors")}

    import respiramfm.models.saved as saved_mod

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(saved_mod, "save_projector", boom)
    with pytest.raises(RuntimeError):
        model.save_pretrained(target)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in target.glob("*.safetensors")} == before  # old model intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directories left
    other = build("llama", seed=3)
    other.save_pretrained(target)  # replacing an existing model directory is fine
    np.testing.assert_array_equal(RespiraMFM.from_pretrained(target).predict_proba(items()),
                                  other.predict_proba(items()))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="refusing"):
        model.save_pretrained(junk)
    assert (junk / "notes.txt").read_text() == "mine"


def test_without_lora_round_trip(tmp_path):
    model = build("phi", lora=LoraSettings(enabled=False))
    assert model.lora_modules() == [] and {n for n, p in model.named_parameters() if p.requires_grad} == \
        {"head.weight", "head.bias"}
    d = model.save_pretrained(tmp_path / "m")
    assert not (d / "adapter").exists()
    np.testing.assert_array_equal(RespiraMFM.from_pretrained(d).predict_proba(items()),
                                  model.predict_proba(items()))


def test_a_cut_llm_saves_and_loads_at_its_depth(tmp_path):
    """``model.num_layers`` survives the save/load round trip with identical probabilities."""
    model = build("llama", num_layers=1)
    assert model.backbone.num_layers == 1 and model.base_identity["layers"] == "first 1 of 2"
    d = model.save_pretrained(tmp_path / "cut")
    again = RespiraMFM.from_pretrained(d)
    assert again.backbone.num_layers == 1 and again.cfg.num_layers == 1
    want = model.predict_proba(items())
    np.testing.assert_allclose(again.predict_proba(items()), want, rtol=0, atol=1e-6)
    full = build("llama")  # same seed, every layer: different outputs
    assert not np.allclose(full.predict_proba(items()), want, atol=1e-4)
    with pytest.raises(ConfigError, match="num_layers must be >= 0"):
        build("llama", num_layers=-1)
