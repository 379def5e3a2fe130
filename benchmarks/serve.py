"""Serving latency and throughput: ``POST /predict`` on loopback vs the same prediction in-process.

The server is the real CLI (``respiramfm serve --port 0``) in a subprocess, so
the client's threads do not share an interpreter with it. Inputs are 8-s WAV
recordings cut from the real ICBHI/KAUH files in ../shared/data (16 kHz, 16-bit,
encoded in memory), each sent with a symptom text; synthetic breath-like noise
when that folder is absent. Three measurements from one run, on the same inputs:

* ``direct``: :meth:`Engine.predict` in this process (decode, front end,
  encoder, LLM; no HTTP) -- the floor the server can reach;
* ``sequential``: one HTTP request at a time (p50/p95 latency, requests/s);
* ``concurrent``: ``--concurrency`` clients at once (p50/p95, requests/s).

``http_over_direct`` is sequential requests/s divided by direct predictions/s
(1.0 = no serving overhead). The model is ``runs/demo/model`` when it exists
(a trained model), else a tiny randomly initialised one built on the fly from
the tiny OPERA-CT fixture; the JSON says which.

    python benchmarks/serve.py [--model DIR] [--requests 40] [--concurrency 4] [--threads 1]
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


def model_dir(arg: str | None, tmp: Path) -> tuple[Path, str]:
    if arg:
        return Path(arg), "given"
    demo = ROOT / "runs" / "demo" / "model"
    if (demo / "config.json").is_file():
        return demo, "runs/demo/model"
    fixture = ROOT.parent / "shared" / "fixtures" / "opera_ct" / "opera_ct_tiny_seed0.safetensors"
    if not fixture.is_file():
        sys.exit("no runs/demo/model and no tiny OPERA-CT fixture in ../shared/fixtures: pass --model DIR")
    from respiramfm.serve.tiny import build_tiny_model

    return build_tiny_model(tmp / "model", fixture), "tiny-random (built on the fly)"


def start_server(model: Path, threads: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "respiramfm.cli", "serve", "--model", str(model), "--port", "0", "--log-level", "info"]
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model directory (default: runs/demo/model, else a tiny model built here)")
    ap.add_argument("--requests", type=int, default=40, help="requests per measurement (bounded run)")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, here and in the server")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        model, which = model_dir(args.model, Path(tmp))
        wavs, source = eight_second_wavs(12)
        reqs = [(wavs[i % len(wavs)], SYMPTOMS[i % len(SYMPTOMS)]) for i in range(args.requests)]

        from respiramfm.serve.app import create_app

        engine = create_app(model).state.engine
        task = engine.tasks()[0]["name"] if not any(t["name"] == "T4" for t in engine.tasks()) else "T4"
        engine.predict(reqs[0][0], "warm.wav", task, reqs[0][1])  # warm-up
        lat, t0 = [], time.perf_counter()
        for wav, text in reqs:
            s = time.perf_counter()
            engine.predict(wav, "clip.wav", task, text)
            lat.append(time.perf_counter() - s)
        direct = summarise(lat, time.perf_counter() - t0)
        del engine

        proc, base = start_server(model, args.threads)
        try:
            assert get_json(base + "/health")[0] == 200

            def one(req) -> float:
                s = time.perf_counter()
                status, body = post_form(base + "/predict", [("task", task), ("symptoms", req[1])],
                                         [("audio", "clip.wav", req[0], "audio/wav")], timeout=600)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {body}")
                return time.perf_counter() - s

            one(reqs[0])  # warm-up
            t0 = time.perf_counter()
            sequential = summarise([one(r) for r in reqs], time.perf_counter() - t0)
            t0 = time.perf_counter()
            with ThreadPoolExecutor(args.concurrency) as pool:
                conc_lat = list(pool.map(one, reqs))
            concurrent = summarise(conc_lat, time.perf_counter() - t0)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(json.dumps({
        "benchmark": "serve", "model": which, "inputs": f"{source} 8-s wav + symptom text", "task": task,
        "threads": args.threads, "concurrency": args.concurrency, "direct": direct, "sequential": sequential,
        "concurrent": concurrent,
        "http_over_direct": round(sequential["requests_per_s"] / direct["requests_per_s"], 3),
    }))


if __name__ == "__main__":
    main()
