"""Serving throughput: the one-lock server against the micro-batching server, 1, 4 and 16 clients, one run.

Both servers are the real CLI (``respiramfm serve --port 0``) in subprocesses, so the
client's threads do not share an interpreter with them: ``one_lock`` answers one request
at a time (``--batch-window-ms 0``), ``batched`` lets requests that arrive within
``--window-ms`` share one encoder pass and one LLM pass per prompt (whose KV cache it
keeps). Inputs are 8-s WAV recordings cut from the real ICBHI/KAUH files in
../shared/data (16 kHz, 16-bit, encoded in memory), each sent with a symptom text;
synthetic breath-like noise when that folder is absent. For each client count the two
servers are measured back to back (same inputs, same background load), p50/p95 latency
and requests/s each; ``direct`` is :meth:`Engine.predict` in this process, one at a time.

``concurrent_speedup`` = batched requests/s / one-lock requests/s at 16 clients (target
>= 2.5). The model is ``runs/demo/model`` when it exists (a trained model), else one of the
demo's shapes with random weights built on the fly (full-size OPERA-CT from the fixture
manifest's weight rule, SmolLM2's first 4 layers, LoRA and head); ``--tiny`` uses the tiny
test model instead. The JSON says which. One JSON line.

    python benchmarks/serve.py [--model DIR | --tiny] [--requests 48] [--window-ms 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from respiramfm.audio import load  # noqa: E402
from respiramfm.serve.client import get_json, post_form  # noqa: E402

SR, SECONDS = 16000, 8.0
SYMPTOMS = ["dry cough", "wheezing and shortness of breath", "fever and chills", "no symptoms"]


def eight_second_wavs(n: int) -> tuple[list[bytes], str]:
    """Up to ``n`` distinct 8-s WAV clips (bytes) from real recordings, else synthetic ones."""
    data = ROOT.parent / "shared" / "data"
    files = sorted((data / "icbhi" / "audio_and_txt_files").glob("*.wav")) + sorted(
        (data / "kauh" / "AudioFiles").glob("*.wav"))
    clips = []
    for f in files:
        y = load(f, sr=SR)
        if len(y) >= SECONDS * SR:
            clips.append(y[: int(SECONDS * SR)])
        if len(clips) == n:
            break
    source = "real"
    if not clips:
        rng = np.random.default_rng(0)
        t = np.arange(int(SECONDS * SR)) / SR
        clips = [(0.1 * rng.standard_normal(len(t)) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * (i + 1) * t)))
                 .astype(np.float32) for i in range(min(n, 8))]
        source = "synthetic"
    out = []
    for y in clips:
        buf = io.BytesIO()
        sf.write(buf, y, SR, format="WAV", subtype="PCM_16")
        out.append(buf.getvalue())
    return out, source


def demo_shaped_model(directory: Path) -> Path:
    """The demo's serving shapes with random weights: full-size OPERA-CT, SmolLM2's first 4 layers, LoRA, head."""
    import dataclasses
    import shutil

    from safetensors.torch import save_file

    from respiramfm.encoders.registry import build_encoder, get_encoder
    from respiramfm.models.configuration import EncoderInfo, FusionConfig, LoraSettings, ProjectorConfig
    from respiramfm.models.fusion import RespiraMFM
    from respiramfm.models.opera_ct import seeded_state_dict
    from respiramfm.models.projector import build_projector

    directory.mkdir(parents=True, exist_ok=True)
    enc_path = directory.parent / "opera_ct_full_random.safetensors"
    save_file(seeded_state_dict(ROOT.parent / "shared" / "fixtures" / "opera_ct" / "opera_ct_state_dict.tsv", 0),
              str(enc_path))
    enc = build_encoder("opera-ct", str(enc_path))
    info = EncoderInfo(name="opera-ct", checkpoint="encoder.safetensors", weights_hash=enc.weights_hash,
                       out_dim=enc.out_dim, frontend=dataclasses.asdict(get_encoder("opera-ct").frontend))
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(in_dim=enc.out_dim, hidden=1024, out_dim=576, final="layernorm"))
    model = RespiraMFM(FusionConfig(backbone="smollm2-135m", num_layers=4, encoder=info, lora=LoraSettings()), proj)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.02)
    model.save_pretrained(directory)
    shutil.copy(enc_path, directory / "encoder.safetensors")
    return directory


def model_dir(arg: str | None, tmp: Path, tiny: bool) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    demo = ROOT / "runs" / "demo" / "model"
    if (demo / "config.json").is_file() and not tiny:
        return demo, "runs/demo/model"
    fixtures = ROOT.parent / "shared" / "fixtures" / "opera_ct"
    if not tiny and (fixtures / "opera_ct_state_dict.tsv").is_file():
        return demo_shaped_model(tmp / "model"), "demo-shaped random (full OPERA-CT, SmolLM2 first 4 layers)"
    fixture = fixtures / "opera_ct_tiny_seed0.safetensors"
    if not fixture.is_file():
        sys.exit("no runs/demo/model and no OPERA-CT fixtures in ../shared/fixtures: pass --model DIR")
    from respiramfm.serve.tiny import build_tiny_model

    return build_tiny_model(tmp / "model", fixture), "tiny-random (built on the fly)"


def start_server(model: Path, threads: int, window_ms: float) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "respiramfm.cli", "serve", "--model", str(model), "--port", "0", "--log-level", "info",
           "--batch-window-ms", str(window_ms)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 300
    lines = []
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"Uvicorn running on (http://[\d.]+:\d+)", line)
        if m:
            # Drain the log in the background so the server never blocks on a full pipe.
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, m.group(1)
    proc.kill()
    sys.exit("server did not start:\n" + "".join(lines))


def summarise(latencies: list[float], wall: float) -> dict:
    lat = np.asarray(latencies) * 1000.0
    return {"p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "requests_per_s": round(len(lat) / wall, 3), "n": len(lat)}


def measure(base: str, task: str, reqs: list, clients: int) -> dict:
    """``len(reqs)`` requests from ``clients`` threads at once; latency percentiles and requests/s."""
    def one(req) -> float:
        s = time.perf_counter()
        status, body = post_form(base + "/predict", [("task", task), ("symptoms", req[1])],
                                 [("audio", "clip.wav", req[0], "audio/wav")], timeout=600)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {body}")
        return time.perf_counter() - s

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        lat = list(pool.map(one, reqs))
    return summarise(lat, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: runs/demo/model, else a tiny model built here)")
    ap.add_argument("--requests", type=int, default=48, help="requests per measurement (bounded run)")
    ap.add_argument("--clients", default="1,4,16", help="client counts to measure (the last gives the speedup)")
    ap.add_argument("--window-ms", type=float, default=4.0, help="the batching server's window")
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in both servers")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of the demo's shapes")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clients = [int(c) for c in args.clients.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model, which = model_dir(args.model, Path(tmp), args.tiny)
        wavs, source = eight_second_wavs(12)
        reqs = [(wavs[i % len(wavs)], SYMPTOMS[i % len(SYMPTOMS)]) for i in range(args.requests)]

        from respiramfm.serve.app import create_app

        engine = create_app(model).state.engine
        task = engine.tasks()[0]["name"] if not any(t["name"] == "T4" for t in engine.tasks()) else "T4"
        engine.predict(reqs[0][0], "warm.wav", task, reqs[0][1])  # warm-up
        lat, t0 = [], time.perf_counter()
        for wav, text in reqs[:12]:
            s = time.perf_counter()
            engine.predict(wav, "clip.wav", task, text)
            lat.append(time.perf_counter() - s)
        direct = summarise(lat, time.perf_counter() - t0)
        del engine

        servers = {"one_lock": start_server(model, args.threads, 0.0),
                   "batched": start_server(model, args.threads, args.window_ms)}
        results: dict[str, dict] = {name: {} for name in servers}
        try:
            for name, (_, base) in servers.items():
                assert get_json(base + "/health")[0] == 200
                measure(base, task, reqs[:4], 4)  # warm-up (and the batching server's prompt caches)
            for n in clients:  # both servers back to back per client count: the same background load
                for name, (_, base) in servers.items():
                    results[name][str(n)] = measure(base, task, reqs, n)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                proc.wait(timeout=60)
    top = str(clients[-1])
    print(json.dumps({
        "benchmark": "serve", "model": which, "inputs": f"{source} 8-s wav + symptom text", "task": task,
        "threads": args.threads, "window_ms": args.window_ms, "requests": args.requests, "direct": direct,
        "one_lock": results["one_lock"], "batched": results["batched"],
        "http_over_direct": round(results["one_lock"][str(clients[0])]["requests_per_s"] / direct["requests_per_s"], 3),
        "concurrent_speedup": round(results["batched"][top]["requests_per_s"]
                                    / results["one_lock"][top]["requests_per_s"], 3),
    }))


if __name__ == "__main__":
    main()
