"""`respiramfm embed` in one process: real recordings, error/skip reports, cache reuse, reading back."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from respiramfm.audio import load, opera_spectrogram
from respiramfm.cli import main as cli_main
from respiramfm.data.records import Record, read_manifest, write_manifest
from respiramfm.encoders.logmel import LogMelStatsEncoder, logmel_stats
from respiramfm.encoders.store import EmbeddingStore, embed_manifest, read_embeddings
from respiramfm.errors import DataError
from respiramfm.utils.io import sha256_file

CORRUPT = b"RIFF\x24\x00\x00\x00WAVEfmt \x10\x00\x00\x00garbage-not-a-format-chunk"


def real_files(shared_data: Path) -> list[Path]:
    icbhi = sorted((shared_data / "icbhi" / "audio_and_txt_files").glob("*.wav"))
    kauh = sorted((shared_data / "kauh" / "AudioFiles").glob("*.wav"))
    assert (len(icbhi), len(kauh)) == (10, 30)
    return icbhi + kauh


def make_manifest(tmp: Path, files: list[Path], corrupt: bool = True, no_audio: bool = True,
                  missing: bool = False) -> Path:
    recs = [Record(record_id=f"rec{i:02d}", patient_id=f"p{i}", dataset="mixed", audio_path=str(f))
            for i, f in enumerate(files)]
    if corrupt:
        (tmp / "corrupt.wav").write_bytes(CORRUPT)
        recs.insert(3, Record(record_id="broken", patient_id="pb", dataset="mixed", audio_path="corrupt.wav"))
    if no_audio:
        recs.append(Record(record_id="textonly", patient_id="pt", dataset="coswara", audio_path=""))
    if missing:
        recs.append(Record(record_id="gone", patient_id="pg", dataset="mixed", audio_path="nowhere/missing.wav"))
    return write_manifest(recs, tmp / "manifest.csv")


@pytest.fixture(scope="module")
def real_store(shared_data, tmp_path_factory):
    """The 40 shared recordings + one corrupt file + one text-only record, embedded with logmel-stats."""
    tmp = tmp_path_factory.mktemp("real")
    manifest = make_manifest(tmp, real_files(shared_data))
    out = tmp / "store"
    assert cli_main(["embed", "--manifest", str(manifest), "--encoder", "logmel-stats", "--out", str(out),
                     "--batch-size", "6"]) == 0
    return manifest, out


def test_real_recordings_embedded_with_one_error_and_one_skip(real_store, shared_data):
    manifest, out = real_store
    store = EmbeddingStore(out)
    assert len(store) == 40 and store.dim == 384
    assert store.ids == [f"rec{i:02d}" for i in range(40)]  # manifest order, the broken record left out
    X = read_embeddings(out)[1]
    assert X.shape == (40, 384) and X.dtype == np.float32 and np.isfinite(X).all()
    assert len({row.tobytes() for row in X}) == 40  # 40 different recordings, 40 different vectors

    errors = (out / "errors.tsv").read_text().splitlines()
    assert errors[0] == "record_id\tpath\tcause" and len(errors) == 2
    rid, path, cause = errors[1].split("\t")
    assert rid == "broken" and Path(path) == manifest.parent / "corrupt.wav" and "wav" in cause
    assert store.errors == [{"record_id": "broken", "path": path, "cause": cause}]
    assert store.skipped == [{"record_id": "textonly", "reason": "no audio"}]

    meta = store.meta
    assert meta["encoder"] == "logmel-stats" and meta["weights_hash"] == LogMelStatsEncoder().weights_hash
    assert meta["frontend_key"].startswith("opera-fe1_sr16000_in8_whole_mel64")
    assert meta["counts"] == {"records": 42, "embedded": 40, "errors": 1, "skipped": 1, "unique_audio": 41,
                              "computed": 40, "reused": 0, "failed_computed": 1}

    # the stored vector is exactly what the encoder computes on the front end's output
    files = real_files(shared_data)
    for i in (0, 5, 17, 39):
        direct = logmel_stats(opera_spectrogram(load(files[i], sr=16000), 16000))
        np.testing.assert_allclose(store.get(f"rec{i:02d}"), direct, atol=1e-5)

    # the view's cache answers by content: any recording's vector from the sha256 of its bytes
    cache = store.cache()
    assert len(cache) == 40 and len(cache.failed) == 1  # the corrupt file is remembered as failed
    np.testing.assert_array_equal(cache.get(sha256_file(files[17])), store.get("rec17"))
    assert sha256_file(files[17]) == store.audio_sha256[17]


def test_rerun_reuses_the_cache_without_encoding(real_store, monkeypatch):
    manifest, out = real_store
    shards = {p: p.stat().st_mtime_ns for p in out.glob("cache/*/shard-*.safetensors")}
    assert len(shards) == 7  # 41 clips in batches of 6 (the corrupt one is remembered as failed)
    before = read_embeddings(out)[1]
    calls = []
    real_encode = LogMelStatsEncoder.encode
    monkeypatch.setattr(LogMelStatsEncoder, "encode", lambda self, specs: calls.append(len(specs)) or real_encode(self, specs))
    meta = embed_manifest(manifest, out, "logmel-stats", batch_size=6)
    assert calls == [] and meta["counts"]["computed"] == 0 and meta["counts"]["reused"] == 40
    assert meta["counts"]["errors"] == 1  # the failure is reported again, from the cache
    assert {p: p.stat().st_mtime_ns for p in out.glob("cache/*/shard-*.safetensors")} == shards
    assert np.array_equal(read_embeddings(out)[1], before)

    # another experiment sharing the cache directory reuses the same vectors for its own manifest
    other = out.parent / "other"
    meta = embed_manifest(manifest, other, "logmel-stats", cache_dir=out / "cache", batch_size=6)
    assert calls == [] and meta["counts"]["reused"] == 40
    assert np.array_equal(read_embeddings(other)[1], before)


def test_retry_errors_and_a_new_front_end_compute_again(real_store, monkeypatch, tmp_path):
    manifest, out = real_store
    seen = []
    real_encode = LogMelStatsEncoder.encode
    monkeypatch.setattr(LogMelStatsEncoder, "encode", lambda self, specs: seen.append(len(specs)) or real_encode(self, specs))
    meta = embed_manifest(manifest, tmp_path / "s", "logmel-stats", cache_dir=out / "cache", retry_errors=True)
    assert seen == [] and meta["counts"]["failed_computed"] == 1 and meta["counts"]["errors"] == 1  # re-decoded only
    few = write_manifest(read_manifest(manifest)[:4], tmp_path / "few.csv")  # rec00-02 and the broken file
    meta = embed_manifest(few, tmp_path / "first", "logmel-stats", cache_dir=out / "cache", crop="first",
                          batch_size=40)
    assert seen == [3] and meta["counts"]["computed"] == 3  # another front end: another cache group
    assert "first8.18" in meta["frontend_key"] and meta["cache_group"] != EmbeddingStore(out).meta["cache_group"]


def test_subset_lookup_and_errors_when_reading(real_store, tmp_path):
    _, out = real_store
    ids, X = read_embeddings(out, ["rec07", "rec02"])
    store = EmbeddingStore(out)
    assert ids == ["rec07", "rec02"] and np.array_equal(X, np.stack([store.get("rec07"), store.get("rec02")]))
    assert "rec07" in store and "broken" not in store
    with pytest.raises(DataError, match="broken"):
        read_embeddings(out, ["rec01", "broken"])
    with pytest.raises(DataError, match="no embedding"):
        store.get("textonly")
    with pytest.raises(DataError, match="not an embedding store"):
        EmbeddingStore(tmp_path)


def test_missing_file_is_an_error_and_text_only_is_skipped(shared_data, tmp_path):
    files = real_files(shared_data)[:2]
    manifest = make_manifest(tmp_path, files, corrupt=False, no_audio=True, missing=True)
    meta = embed_manifest(manifest, tmp_path / "out", "logmel-stats")
    assert meta["counts"]["embedded"] == 2 and meta["counts"]["errors"] == 1 and meta["counts"]["skipped"] == 1
    store = EmbeddingStore(tmp_path / "out")
    assert store.errors[0]["record_id"] == "gone" and store.errors[0]["cause"] == "audio file not found"
    assert store.errors[0]["path"].endswith("missing.wav")

    # nothing embeddable at all: still a valid, empty store with its reports
    nothing = make_manifest(tmp_path, [], corrupt=True, no_audio=True, missing=True)
    meta = embed_manifest(nothing, tmp_path / "empty", "logmel-stats")
    assert meta["counts"] == {"records": 3, "embedded": 0, "errors": 2, "skipped": 1, "unique_audio": 1,
                              "computed": 0, "reused": 0, "failed_computed": 1}
    ids, X = read_embeddings(tmp_path / "empty")
    assert ids == [] and X.shape == (0, 384)
    assert [e["record_id"] for e in EmbeddingStore(tmp_path / "empty").errors] == ["broken", "gone"]


def test_stale_temporaries_are_cleared_and_a_held_lock_refuses(shared_data, tmp_path):
    import fcntl

    manifest = make_manifest(tmp_path, real_files(shared_data)[:3], corrupt=False, no_audio=False)
    out = tmp_path / "out"
    embed_manifest(manifest, out, "logmel-stats")
    group = next(out.glob("cache/*/group.json")).parent
    leftover = group / ".shard-abc.safetensors.x1y2.safetensors.tmp"  # what a SIGKILL mid-write leaves
    leftover.write_bytes(b"half")
    memo_leftover = out / "cache" / ".file_hashes.json.k3j4.tmp"
    memo_leftover.write_bytes(b"{")
    embed_manifest(manifest, out, "logmel-stats")
    assert not leftover.exists() and not memo_leftover.exists()
    with open(out / ".lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(DataError, match="another `respiramfm embed` run"):
            embed_manifest(manifest, out, "logmel-stats")


def test_cli_reports_bad_arguments_cleanly(real_store, capsys):
    manifest, out = real_store
    rc = cli_main(["embed", "--manifest", str(manifest), "--encoder", "logmel-stats", "--out", str(out),
                   "--tokens"])
    assert rc == 1 and "no token grid" in capsys.readouterr().err
    rc = cli_main(["embed", "--manifest", str(manifest), "--encoder", "opera-ct", "--out", str(out)])
    assert rc == 1 and "needs a checkpoint" in capsys.readouterr().err
    rc = cli_main(["embed", "--manifest", str(out / "nope.csv"), "--encoder", "logmel-stats", "--out", str(out)])
    assert rc == 1 and "manifest not found" in capsys.readouterr().err
    assert len(EmbeddingStore(out)) == 40  # a failed invocation leaves the store as it was


def test_opera_ct_store_pooled_and_tokens(shared_data, opera_fixtures, tmp_path):
    from respiramfm.encoders.registry import build_encoder

    ckpt = str(opera_fixtures / "opera_ct_tiny_seed0.safetensors")
    files = real_files(shared_data)
    subset = [files[0], files[9], files[10], files[25]]  # 44.1 kHz and 4 kHz, short and long
    manifest = make_manifest(tmp_path, subset, corrupt=True, no_audio=False)
    meta = embed_manifest(manifest, tmp_path / "pooled", "opera-ct", checkpoint=ckpt, batch_size=2)
    assert meta["counts"]["embedded"] == 4 and meta["counts"]["errors"] == 1 and meta["dim"] == 128
    ids, X = read_embeddings(tmp_path / "pooled")
    assert X.shape == (4, 128)
    enc = build_encoder("opera-ct", checkpoint=ckpt)
    assert meta["weights_hash"] == enc.weights_hash
    specs = [opera_spectrogram(load(f, sr=16000), 16000) for f in subset]
    np.testing.assert_allclose(X, enc.encode(specs), atol=1e-4)

    meta = embed_manifest(manifest, tmp_path / "tokens", "opera-ct", checkpoint=ckpt, batch_size=2, tokens=True,
                          num_workers=2)
    store = EmbeddingStore(tmp_path / "tokens")
    assert meta["kind"] == "tokens" and store.array.shape == (4, 64, 128) and store.dim == 128
    np.testing.assert_allclose(store.array[:].mean(axis=1), X, atol=1e-4)
    index = json.loads((tmp_path / "tokens" / "index.json").read_text())
    assert index["cache_group"] != json.loads((tmp_path / "pooled" / "index.json").read_text())["cache_group"]
    assert not [p for p in os.listdir(tmp_path / "tokens") if p.endswith(".tmp")]


def _synthetic_manifest(tmp: Path, n: int) -> Path:
    """``n`` distinct 1 s clips (noise + a clip-specific tone) written as 16-bit wav."""
    import soundfile as sf

    t = np.arange(16000) / 16000
    recs = []
    for i in range(n):
        path = tmp / f"clip{i:03d}.wav"
        if not path.exists():
            y = 0.05 * np.random.default_rng(i).standard_normal(t.size) + 0.3 * np.sin(2 * np.pi * (150 + 7 * i) * t)
            sf.write(path, y.astype(np.float32), 16000, subtype="PCM_16")
        recs.append(Record(record_id=f"c{i:03d}", patient_id=f"p{i}", dataset="synthetic", audio_path=path.name))
    return write_manifest(recs, tmp / f"manifest_{n}.csv")


def test_peak_memory_does_not_grow_with_the_number_of_clips(tmp_path):
    """Traced (numpy/Python) peak for 30 clips stays at the 6-clip level: one batch alive at a time.

    Keeping every padded 8 s waveform and spectrogram would add ~0.6 MB per clip
    (~15 MB here). ``benchmarks/store_rss.py`` measures process RSS at 100 vs 1,000 clips.
    """
    import tracemalloc

    embed_manifest(_synthetic_manifest(tmp_path, 1), tmp_path / "warm", "logmel-stats", progress=False)
    peaks = {}
    for n in (6, 30):
        manifest = _synthetic_manifest(tmp_path, n)
        tracemalloc.start()
        try:
            meta = embed_manifest(manifest, tmp_path / f"out{n}", "logmel-stats", batch_size=3, progress=False)
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert meta["counts"]["embedded"] == n
    assert peaks[30] < 1.25 * peaks[6] + 1_000_000, peaks


def test_a_clip_the_front_end_rejects_is_reported_and_its_batch_mates_kept(shared_data, tmp_path, monkeypatch):
    """If the front end refuses one waveform of a batch, only that record becomes an error."""
    import respiramfm.audio as audio
    from respiramfm.errors import AudioDecodeError

    files = real_files(shared_data)[:3]
    manifest = make_manifest(tmp_path, files, corrupt=False, no_audio=False)
    reject = load(files[1], sr=16000)
    real_batch = audio.opera_spectrogram_batch

    def picky(waves, cfg=None, device="cpu"):
        if any(np.array_equal(w, reject) for w in waves):
            raise AudioDecodeError("clip 1: refused for the test")
        return real_batch(waves, cfg=cfg, device=device)

    monkeypatch.setattr(audio, "opera_spectrogram_batch", picky)
    meta = embed_manifest(manifest, tmp_path / "out", "logmel-stats", batch_size=3)
    store = EmbeddingStore(tmp_path / "out")
    assert meta["counts"]["embedded"] == 2 and store.ids == ["rec00", "rec02"]
    assert store.errors == [{"record_id": "rec01", "path": str(files[1]),
                             "cause": "front end failed: clip 1: refused for the test"}]
