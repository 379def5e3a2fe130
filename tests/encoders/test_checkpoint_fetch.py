"""``respiramfm fetch-opera``: offline failure, verification, and conversion of a Lightning checkpoint."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from respiramfm.cli import main
from respiramfm.encoders import fetch
from respiramfm.models.opera_ct import HTSAT_PREFIX, from_checkpoint
from respiramfm.errors import CheckpointError


def _fake_release(opera_fixtures, path):
    """A Lightning-format file shaped like the release: tiny encoder, front end, COLA head, optimizer, hparams."""
    state = load_file(str(opera_fixtures / "opera_ct_tiny_seed0.safetensors"))
    state[HTSAT_PREFIX + "spectrogram_extractor.stft.conv_real.weight"] = torch.randn(513, 1, 1024)
    state[HTSAT_PREFIX + "spectrogram_extractor.stft.conv_imag.weight"] = torch.randn(513, 1, 1024)
    state[HTSAT_PREFIX + "logmel_extractor.melW"] = torch.rand(513, 64)
    state.update({"g.weight": torch.randn(512, 128), "g.bias": torch.zeros(512), "layer_norm.weight": torch.ones(512),
                  "layer_norm.bias": torch.zeros(512), "linear.weight": torch.randn(512, 512)})
    ckpt = {"epoch": 9, "state_dict": state, "hyper_parameters": argparse.Namespace(encoder="htsat", dim_out=512),
            "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4}]}]}
    torch.save(ckpt, path)
    return state


def test_offline_fails_clearly(tmp_path, capsys):
    assert main(["fetch-opera", "--out", str(tmp_path / "w")]) == 1
    err = capsys.readouterr().err
    assert "HF_HUB_OFFLINE" in err and "network" in err
    assert not (tmp_path / "w" / fetch.CONVERTED_NAME).exists()


def test_converts_a_local_lightning_checkpoint(tmp_path, opera_fixtures, capsys):
    src = tmp_path / "encoder-operaCT.ckpt"
    state = _fake_release(opera_fixtures, src)
    out = tmp_path / "out"
    assert main(["fetch-opera", "--out", str(out), "--checkpoint", str(src)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    dst = out / fetch.CONVERTED_NAME
    assert summary["safetensors"] == str(dst) and summary["verified"] is False  # not the released bytes
    converted = load_file(str(dst))
    assert sorted(converted) == sorted(k[len(HTSAT_PREFIX):] for k in state if k.startswith(HTSAT_PREFIX))
    assert summary["keys"] == len(converted) == 98
    with safe_open(str(dst), "pt") as fh:
        meta = fh.metadata()
    assert meta["source_sha256"] == summary["sha256"] and meta["stripped_prefix"] == HTSAT_PREFIX

    encoder = from_checkpoint(dst)
    reference = from_checkpoint(opera_fixtures / "opera_ct_tiny_seed0.safetensors")
    assert encoder.weights_sha256 == reference.weights_sha256 == summary["weights_sha256"]
    npz = np.load(opera_fixtures / "opera_ct_tiny_seed0.npz")
    out251 = encoder(torch.from_numpy(npz["spec_T251"])[None])[0].numpy()
    assert np.abs(out251 - npz["out_T251"]).max() < 1e-4


def test_conversion_rejects_non_opera_files(tmp_path):
    torch.save({"state_dict": {"model.weight": torch.zeros(2)}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not an OPERA-CT"):
        fetch.convert(tmp_path / "other.ckpt", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


def test_download_verification(tmp_path, opera_fixtures, monkeypatch):
    """The hub call itself is replaced; what is tested is verify-then-convert around it."""
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []

    def fake_download(repo_id, filename, revision=None, local_dir=None, **_):
        calls.append((repo_id, filename, revision))
        path = local_dir / filename
        _fake_release(opera_fixtures, path)
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(CheckpointError, match="does not match revision"):
        fetch.run(argparse.Namespace(out=tmp_path / "a", revision=fetch.KNOWN_REVISION, checkpoint=None))
    assert not (tmp_path / "a" / fetch.CONVERTED_NAME).exists()
    assert calls == [("evelyn0414/OPERA", "encoder-operaCT.ckpt", fetch.KNOWN_REVISION)]
    # an unpinned revision has no recorded hash: verification is skipped, conversion proceeds
    assert fetch.run(argparse.Namespace(out=tmp_path / "b", revision="main", checkpoint=None)) == 0
    assert (tmp_path / "b" / fetch.CONVERTED_NAME).is_file()
