"""Tampered model directories and non-regular input files: one typed error each, fast, bounded, offline.

Every variant below is built from one real saved model (tiny Llama). All of them are then run through
``respiramfm predict`` in ONE child process, which blocks the network (any connection attempt is
recorded) and reports each command's exit code, stderr and time; the parent asserts a typed
``respiramfm predict: error:`` line naming the problem, no traceback, no network attempt, each case
quick, and the child's peak memory not growing past the good model's (a config asking for a
10**9-point FFT or a 10**6-wide "tiny" LLM must be refused before anything is allocated). A FIFO anywhere would hang a reader that
opens it blindly, so the child runs under a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from respiramfm.errors import CheckpointError
from respiramfm.models.configuration import EncoderInfo, FusionConfig, ProjectorConfig
from respiramfm.models.files import read_json
from respiramfm.models.fusion import RespiraMFM
from respiramfm.models.projector import build_projector

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

IN_DIM = 16
CASE_SECONDS = 20.0            # each refusal; loading the good model takes ~1 s
GROWTH_BOUND = 512 * 1024 ** 2  # bytes of peak RSS a refused case may add (a 10**9-point FFT would need 119 GiB)
PEAK_RSS_BOUND = 4 * 1024 ** 3  # bytes, the whole child (torch + transformers + tokenizer + tiny model)

# The child: run each command through the real CLI entry point, network blocked and recorded.
CHILD = r"""
import contextlib, io, json, resource, socket, sys, time, traceback
attempts = []
def _blocked(*a, **k):
    attempts.append(repr(a)[:120])
    raise OSError("network blocked by the test")
socket.socket.connect = _blocked
socket.create_connection = _blocked
from respiramfm.cli import main
out = []
for name, argv in json.load(open(sys.argv[1])):
    before, err, t0 = len(attempts), io.StringIO(), time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv)
        except BaseException:
            rc = "exception"
            err.write(traceback.format_exc())
    out.append({"name": name, "rc": rc, "stderr": err.getvalue()[-3000:], "seconds": time.perf_counter() - t0,
                "network": attempts[before:], "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
out.append({"peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})
print(json.dumps(out))
"""


def _edit(name: str = "config.json") -> Callable:
    """A mutation of one JSON file of the directory: ``fn(info)`` edits it in place."""
    def wrap(fn):
        def apply(d: Path) -> None:
            p = d / name
            info = json.loads(p.read_text())
            fn(info)
            p.write_text(json.dumps(info))
        return apply
    return wrap


def _replace(name: str, make: Callable[[Path], None]) -> Callable:
    def apply(d: Path) -> None:
        p = d / name
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        make(p)
    return apply


def _set(path: str, value) -> Callable:
    keys = path.split(".")

    @_edit()
    def apply(info):
        node = info
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return apply


def _huge_projector(d: Path) -> None:
    """projector.json asks for a 60,000-wide hidden layer; the weights no longer embed their config."""
    _edit("projector.json")(lambda i: i["config"].update(hidden=60_000))(d)
    w = d / "projector.safetensors"
    save_file(load_file(w), w, metadata={"format": "respiramfm.projector"})


# name -> (mutation, words the error must contain)
VARIANTS: dict[str, tuple[Callable, str]] = {
    "adapter_config_list": (_replace("adapter/adapter_config.json", lambda p: p.write_text("[1, 2]")),
                            "must hold a JSON object"),
    "adapter_config_dir": (_replace("adapter/adapter_config.json", lambda p: p.mkdir()), "not a regular file"),
    "adapter_config_not_utf8": (_replace("adapter/adapter_config.json", lambda p: p.write_bytes(b"\xff\xfe{}")),
                                "not UTF-8"),
    "config_dir": (_replace("config.json", lambda p: p.mkdir()), "not a regular file"),
    "config_symlink_loop": (_replace("config.json", lambda p: p.symlink_to(p.name)), "symlink loop"),
    "config_deep": (_replace("config.json", lambda p: p.write_text("[" * 100_000 + "]" * 100_000)),
                    "nested too deeply"),
    "config_huge": (_replace("config.json", lambda p: p.write_text("{" + " " * (5 << 20) + "}")), "above the limit"),
    "config_dev_zero": (_replace("config.json", lambda p: p.symlink_to(Path(os.devnull).with_name("zero"))),
                        "not a regular file"),
    "config_fifo": (_replace("config.json", lambda p: os.mkfifo(p)), "not a regular file"),
    "head_fifo": (_replace("head.safetensors", lambda p: os.mkfifo(p)), "not a regular file"),
    "adapter_weights_fifo": (_replace("adapter/adapter_model.safetensors", lambda p: os.mkfifo(p)),
                             "not a regular file"),
    "projector_json_fifo": (_replace("projector.json", lambda p: os.mkfifo(p)), "not a regular file"),
    "projector_weights_fifo": (_replace("projector.safetensors", lambda p: os.mkfifo(p)), "not a regular file"),
    "fusion_list": (_set("fusion", [1]), "'fusion' must be a JSON object"),
    "tasks_list": (_set("tasks", ["T4"]), "'tasks' must be a JSON object"),
    "task_entry_string": (_set("tasks.T4", "T4"), "tasks.T4 must be a JSON object"),
    "task_field_type": (_set("tasks.T4.disease", {"x": 1}), "tasks.T4.disease must be a JSON string"),
    "lora_extra_unknown": (_set("fusion.lora.extra", {"evil": 1}), "lora.extra"),
    "frontend_unknown_key": (_set("fusion.encoder.frontend.evil", 1), "unknown key"),
    "frontend_n_fft_float": (_set("fusion.encoder.frontend.n_fft", 1e9), "n_fft"),
    "frontend_n_fft_int": (_set("fusion.encoder.frontend.n_fft", 10 ** 9), "n_fft"),
    "n_audio_tokens_huge": (_set("fusion.n_audio_tokens", 10 ** 12), "n_audio_tokens"),
    "tiny_huge": (_set("fusion.tiny", {"hidden_size": 10 ** 6}), "fusion.tiny.hidden_size"),
    "attn_bogus": (_set("fusion.attn_implementation", "evil"), "attn_implementation"),
    "order_string": (_set("fusion.order", "audio"), "fusion.order"),
    "backbone_hub_id": (_set("fusion.backbone", "gpt2"), "gpt2"),
    "tensors_list": (_set("tensors", []), "'tensors' must be a JSON object"),
    "tensors_shape_lie": (_set("tensors.head.weight", [3, 64]), "config.json tensors"),
    "tensors_not_shape": (_set("tensors.head.weight", "big"), "is not a shape"),
    "projector_config_string": (_set("projector.config", "x"), "projector.config"),
    "projector_config_differs": (_set("projector.config.hidden", 48), "different projectors"),
    "projector_json_huge_hidden": (lambda d: _huge_projector(d), "far too small"),
    "files_escape": (_set("files", {"../outside.safetensors": "0" * 64}), "inside the model directory"),
    "version_odd": (_set("version", "1; rm -rf"), "unsupported model format version"),
}


def _build_model() -> RespiraMFM:
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(in_dim=IN_DIM, hidden=32, out_dim=64))
    enc = EncoderInfo(name="opera-ct", checkpoint="encoder.safetensors", weights_hash="ab" * 32, out_dim=IN_DIM,
                      frontend={"sr": 16000, "input_sec": 8.0})
    return RespiraMFM(FusionConfig(backbone="tiny-llama", encoder=enc), proj)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return _build_model().save_pretrained(tmp_path_factory.mktemp("tampered") / "good")


@pytest.fixture(scope="module")
def results(good, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("variants")
    cmds = [("good", ["predict", "--model", str(good), "--task", "T4", "--symptoms", "dry cough"])]
    for name, (mutate, _) in VARIANTS.items():
        d = root / name
        shutil.copytree(good, d)
        mutate(d)
        cmds.append((name, ["predict", "--model", str(d), "--task", "T4", "--symptoms", "dry cough"]))
    inputs = root / "inputs"
    inputs.mkdir()
    os.mkfifo(inputs / "audio.fifo")
    os.mkfifo(inputs / "meta.fifo")
    (inputs / "audio.wav").mkdir()
    (inputs / "meta.json").mkdir()
    base = ["predict", "--model", str(good), "--task", "T4"]
    cmds += [("audio_dir", base + ["--audio", str(inputs / "audio.wav")]),
             ("audio_fifo", base + ["--audio", str(inputs / "audio.fifo")]),
             ("metadata_fifo", base + ["--metadata", str(inputs / "meta.fifo")]),
             ("metadata_dir", base + ["--metadata", str(inputs / "meta.json")])]
    plan = root / "plan.json"
    plan.write_text(json.dumps(cmds))
    env = dict(os.environ, HF_HUB_OFFLINE="0", TRANSFORMERS_OFFLINE="0")  # only local_only keeps us offline
    proc = subprocess.run([sys.executable, "-c", CHILD, str(plan)], capture_output=True, text=True, timeout=600,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    return {r.get("name", "_peak"): r for r in rows}


def test_good_model_predicts(results):
    assert results["good"]["rc"] == 0, results["good"]["stderr"]


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_tampered_directory_is_one_typed_error(results, name):
    r = results[name]
    assert r["rc"] == 1, r["stderr"]
    assert r["stderr"].startswith("respiramfm predict: error: ") and "Traceback" not in r["stderr"], r["stderr"]
    assert VARIANTS[name][1] in r["stderr"], r["stderr"]
    assert r["seconds"] < CASE_SECONDS
    assert r["network"] == [], r["network"]


@pytest.mark.parametrize("name", ["audio_dir", "audio_fifo", "metadata_fifo", "metadata_dir"])
def test_non_regular_inputs_are_refused_by_name(results, name):
    r = results[name]
    assert r["rc"] == 1 and r["stderr"].startswith("respiramfm predict: error: "), r["stderr"]
    assert "not a regular file" in r["stderr"] and "Traceback" not in r["stderr"], r["stderr"]
    assert ("audio" if name.startswith("audio") else "meta") in r["stderr"]
    assert r["seconds"] < CASE_SECONDS


def test_child_memory_stays_bounded(results):
    """After the good model has loaded (the first command), no tampered case adds more than GROWTH_BOUND."""
    growth = {n: r["rss"] - results["good"]["rss"] for n, r in results.items() if "rss" in r}
    assert max(growth.values()) < GROWTH_BOUND, growth
    assert results["_peak"]["peak_rss"] < PEAK_RSS_BOUND


def test_read_json_refuses_wrong_top_level_type_and_depth(tmp_path):
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"a": [1, 2]}))
    assert read_json(p) == {"a": [1, 2]}
    p.write_text("[1]")
    with pytest.raises(CheckpointError, match="must hold a JSON object, found array"):
        read_json(p)
    p.write_text(json.dumps(np.zeros((1,) * 40).tolist()))
    with pytest.raises(CheckpointError, match="nested too deeply"):
        read_json(p, kind=list)
