"""Safe checkpoint loading: safetensors, weights-only torch files, Lightning extras, malicious pickles."""

from __future__ import annotations

import argparse
import builtins
import decimal
import os
import pickle
import subprocess

import pytest
import torch
from safetensors.torch import save_file

from respiramfm.encoders.checkpoint import OpaqueObject, load_state_dict, restricted_load
from respiramfm.errors import CheckpointError


class AttributeDict(dict):
    """Lightning-style hyper-parameter container (a dict subclass with attribute access)."""

    def __getattr__(self, key):
        return self[key]


class RunsShell:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class WritesFile:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (f"open({self.marker!r}, 'w').write('pwned')",))


class SpawnsProcess:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (subprocess.Popen, (["touch", self.marker],))


def _weights():
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3)
    return lin, {"net.weight": lin.weight.detach().clone(), "net.bias": lin.bias.detach().clone(),
                 "bn.num_batches_tracked": torch.tensor(7), "half": torch.randn(5).half(),
                 "view": torch.arange(10.0)[2:6]}


def _lightning(extra_hparams):
    lin, state = _weights()
    opt = torch.optim.Adam(lin.parameters(), lr=1e-3)
    lin(torch.randn(2, 4)).sum().backward()
    opt.step()
    return state, {"epoch": 4, "global_step": 120, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                   "optimizer_states": [opt.state_dict()], "lr_schedulers": [], "hparams_name": "kwargs",
                   "hyper_parameters": extra_hparams, "callbacks": {"ModelCheckpoint": {"best": torch.tensor(0.5)}}}


def _same(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_safetensors_and_plain_torch_files(tmp_path):
    _, state = _weights()
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    torch.save(state, tmp_path / "w.pt")
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pt", "w.pth"):
        _same(load_state_dict(tmp_path / name), state)


def test_lightning_checkpoint_with_objects_falls_back_to_restricted_loader(tmp_path):
    hp = AttributeDict(lr=1e-3, encoder="htsat", args=argparse.Namespace(batch=64, dims=[1, 2]),
                       price=decimal.Decimal("1.5"))
    state, ckpt = _lightning(hp)
    path = tmp_path / "model.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the case the fallback exists for
    _same(load_state_dict(path), state)
    whole = restricted_load(path)
    assert whole["epoch"] == 4 and whole["pytorch-lightning_version"] == "2.4.0"
    hparams = whole["hyper_parameters"]
    assert isinstance(hparams, OpaqueObject) and hparams.origin.endswith("AttributeDict")
    assert dict(hparams.items)["encoder"] == "htsat"
    assert isinstance(dict(hparams.items)["args"], OpaqueObject)  # never built as a real Namespace
    assert dict(hparams.items)["price"].origin == "decimal.Decimal"
    exp_avg = whole["optimizer_states"][0]["state"][0]["exp_avg"]
    assert isinstance(exp_avg, torch.Tensor) and exp_avg.shape == (3, 4)


@pytest.mark.parametrize("payload", ["shell", "file", "process"])
def test_malicious_pickles_are_rejected_without_running(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = {"shell": RunsShell(marker), "file": WritesFile(marker), "process": SpawnsProcess(marker)}[payload]
    _, state = _weights()
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": {"x": evil}}, path)
    with pytest.raises(CheckpointError, match="refusing to load") as err:
        load_state_dict(path)
    assert str(path) in str(err.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_legacy_plain_pickle_is_not_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "legacy.pt"
    path.write_bytes(pickle.dumps({"state_dict": {}, "x": RunsShell(marker)}))
    with pytest.raises(CheckpointError):
        load_state_dict(path)
    assert not marker.exists()


def test_bad_files_are_typed_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "none.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_state_dict(tmp_path / "junk.ckpt")
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(CheckpointError):
        load_state_dict(tmp_path / "junk.safetensors")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(CheckpointError, match="extension"):
        load_state_dict(tmp_path / "w.npz")
    torch.save({"state_dict": {"a": torch.zeros(1), "b": "text"}}, tmp_path / "mixed.ckpt")
    with pytest.raises(CheckpointError, match="not tensors: b"):
        load_state_dict(tmp_path / "mixed.ckpt")
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(CheckpointError, match="expected a state dict"):
        load_state_dict(tmp_path / "list.pt")


def test_truncated_archive_is_a_typed_error(tmp_path):
    _, state = _weights()
    _, ckpt = _lightning(argparse.Namespace(a=1))
    torch.save(ckpt, tmp_path / "full.ckpt")
    data = (tmp_path / "full.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError):
        load_state_dict(tmp_path / "cut.ckpt")
