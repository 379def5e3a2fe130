"""`respiramfm embed` across processes: SIGKILL + resume, and 2 ranks (torchrun) vs 1 process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from respiramfm.data.records import Record, write_manifest
from respiramfm.encoders.logmel import LogMelStatsEncoder
from respiramfm.encoders.store import EmbeddingStore, embed_manifest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _manifest(shared_data: Path, tmp: Path, n_kauh: int = 30) -> Path:
    files = sorted((shared_data / "icbhi" / "audio_and_txt_files").glob("*.wav"))
    files += sorted((shared_data / "kauh" / "AudioFiles").glob("*.wav"))[:n_kauh]
    recs = [Record(record_id=f"r{i:02d}", patient_id=f"p{i}", dataset="mixed", audio_path=str(f))
            for i, f in enumerate(files)]
    (tmp / "corrupt.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00not-a-format-chunk")
    recs.insert(2, Record(record_id="broken", patient_id="pb", dataset="mixed", audio_path="corrupt.wav"))
    recs.append(Record(record_id="textonly", patient_id="pt", dataset="mixed", audio_path=""))
    return write_manifest(recs, tmp / "manifest.csv")


def _shards(out: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("cache/*/shard-*.safetensors")}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def _all_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_sigkill_then_resume_equals_an_uninterrupted_run(shared_data, tmp_path, monkeypatch):
    manifest = _manifest(shared_data, tmp_path, n_kauh=5)
    n = 15
    # 30 s clips: enough work per batch that the run can be killed between shards
    args = ["--manifest", str(manifest), "--encoder", "logmel-stats", "--batch-size", "1", "--input-sec", "30",
            "--no-progress"]
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "respiramfm.cli", "embed", *args, "--out", str(out)],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(_shards(out)) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = _shards(out)
    assert 3 <= len(done) < n + 1, "the run must be killed between its first and its last shard"
    assert not (out / "index.json").exists()  # no view from a killed run

    from safetensors import safe_open

    done_keys = set()
    for name in done:
        with safe_open(str(next(out.glob(f"cache/*/{name}"))), framework="np") as fh:
            done_keys |= set(fh.keys())

    encoded = []
    real_encode = LogMelStatsEncoder.encode
    monkeypatch.setattr(LogMelStatsEncoder, "encode",
                        lambda self, specs: encoded.append(len(specs)) or real_encode(self, specs))
    from respiramfm.cli import main as cli_main

    assert cli_main(["embed", *args, "--out", str(out)]) == 0
    resumed = EmbeddingStore(out)
    assert sum(encoded) == n - len(done_keys)  # finished items were not recomputed...
    assert resumed.meta["counts"]["reused"] == len(done_keys)
    assert {k: v for k, v in _shards(out).items() if k in done} == done  # ...nor rewritten
    assert not [f for f in _all_files(out) if f.endswith(".tmp")]  # no partial file survives

    ref_out = tmp_path / "uninterrupted"
    assert cli_main(["embed", *args, "--out", str(ref_out)]) == 0
    ref = EmbeddingStore(ref_out)
    assert resumed.ids == ref.ids and len(ref) == n
    assert np.array_equal(resumed.array, ref.array)
    assert (out / "errors.tsv").read_text() == (ref_out / "errors.tsv").read_text()
    assert sorted(_shards(out)) == sorted(_shards(ref_out))  # same batches, hence same shard names


def test_two_ranks_give_the_one_process_result_bit_for_bit(shared_data, opera_fixtures, tmp_path):
    """With a torch encoder, where batch composition could change the floats: it must not."""
    encoder = "opera-ct"
    torchrun = BIN / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    manifest = _manifest(shared_data, tmp_path, n_kauh=4)
    args = ["--manifest", str(manifest), "--encoder", encoder, "--batch-size", "3", "--no-progress"]
    if encoder == "opera-ct":
        args += ["--checkpoint", str(opera_fixtures / "opera_ct_tiny_seed0.safetensors")]
    two = subprocess.run([str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "respiramfm.cli", "embed",
                          *args, "--out", str(tmp_path / "two")], env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one = embed_manifest(manifest, tmp_path / "one", encoder, checkpoint=args[-1], batch_size=3, progress=False)
    a, b = EmbeddingStore(tmp_path / "one"), EmbeddingStore(tmp_path / "two")
    assert a.ids == b.ids and len(a) == 14
    assert np.array_equal(a.array, b.array)
    assert (tmp_path / "one" / "errors.tsv").read_text() == (tmp_path / "two" / "errors.tsv").read_text()
    assert a.meta["counts"] == b.meta["counts"] == one["counts"]
    # both ranks really worked: shards carry their writer
    from safetensors import safe_open

    writers = set()
    for p in (tmp_path / "two").glob("cache/*/shard-*.safetensors"):
        with safe_open(str(p), framework="np") as fh:
            writers.add(fh.metadata()["writer"])
    assert writers == {"rank0/2", "rank1/2"}

