"""The one input processor on real recordings: every input kind gives the same model input.

A path, the same file's bytes, its decoded :class:`Waveform` and the bare waveform array must
give bit-identical spectrograms; a store lookup returns the stored vector (or why there is
none); the record-context rule is the one training, evaluation and prediction share.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from respiramfm.audio import FrontendConfig, load, opera_spectrogram
from respiramfm.cli import main as cli_main
from respiramfm.data.records import Record, write_manifest
from respiramfm.data.templates import render_context
from respiramfm.data.tasks import get_task
from respiramfm.errors import AudioContentError, AudioDecodeError, ConfigError, DataError
from respiramfm.models.processing import (InputProcessor, Waveform, metadata_to_record, parse_metadata,
                                          record_context)

FE = FrontendConfig()


@pytest.fixture(scope="module")
def wavs(shared_data) -> list[Path]:
    files = sorted((shared_data / "icbhi" / "audio_and_txt_files").glob("*.wav"))[:3]
    assert len(files) == 3
    return files


@pytest.fixture(scope="module")
def store(wavs, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("proc")
    recs = [Record(record_id=f"r{i}", patient_id=f"p{i}", dataset="icbhi", audio_path=str(f), audio_type="lung",
                   diagnosis="copd") for i, f in enumerate(wavs)]
    manifest = write_manifest(recs, tmp / "manifest.csv")
    out = tmp / "store"
    assert cli_main(["embed", "--manifest", str(manifest), "--encoder", "logmel-stats", "--out", str(out)]) == 0
    return out


def test_every_audio_kind_gives_the_same_spectrogram(wavs):
    proc = InputProcessor(FE)
    path = wavs[0]
    by_path = proc.spectrogram(path)
    by_bytes = proc.spectrogram(path.read_bytes(), name="upload.bin")  # format sniffed, not taken from the name
    wave = load(path, sr=FE.sr)
    by_array = proc.spectrogram(wave)
    decoded = proc.waveform(path.read_bytes(), "x.wav")
    assert isinstance(decoded, Waveform) and decoded.format == "wav" and decoded.sr == FE.sr
    np.testing.assert_array_equal(by_path, by_bytes)
    np.testing.assert_array_equal(by_path, by_array)
    np.testing.assert_array_equal(proc.spectrogram(decoded), by_path)
    assert proc.spectrogram(decoded) is proc.spectrogram(decoded)  # computed once per Waveform
    np.testing.assert_allclose(by_path, opera_spectrogram(wave, FE.sr, cfg=FE), atol=1e-5)  # the numpy reference


def test_batch_spectrograms_match_single_and_report_bad_files_in_place(wavs, tmp_path):
    proc = InputProcessor(FE)
    (tmp_path / "dir.wav").mkdir()
    out = proc.spectrograms([wavs[1], tmp_path / "dir.wav", tmp_path / "absent.wav", wavs[2]])
    np.testing.assert_allclose(out[0], proc.spectrogram(wavs[1]), atol=1e-6)
    assert isinstance(out[1], AudioDecodeError) and "not a regular file" in str(out[1])
    assert isinstance(out[2], AudioDecodeError) and "not found" in str(out[2])
    np.testing.assert_allclose(out[3], proc.spectrogram(wavs[2]), atol=1e-6)


def test_non_regular_and_empty_inputs_are_typed_errors(tmp_path, wavs):
    proc = InputProcessor(FE)
    (tmp_path / "a.wav").mkdir()
    os.mkfifo(tmp_path / "b.wav")
    for p in (tmp_path / "a.wav", tmp_path / "b.wav"):
        with pytest.raises(AudioDecodeError, match="not a regular file"):
            proc.waveform(p)
    with pytest.raises(AudioDecodeError, match="not found"):
        proc.waveform(tmp_path / "absent.wav")
    with pytest.raises(AudioDecodeError):
        proc.waveform(b"", "empty.wav")
    with pytest.raises(AudioContentError):
        proc.waveform(np.zeros(FE.sr * 3, np.float32))  # digital silence: nothing to score
    with pytest.raises(AudioDecodeError, match="1-D float"):
        proc.waveform(np.zeros((2, 10), np.float32))
    with pytest.raises(AudioDecodeError, match="Hz"):
        proc.waveform(Waveform("w", load(wavs[0], sr=8000), 8000))
    with pytest.raises(ConfigError):
        proc.waveform(12345)


def test_record_context_rule():
    rec = Record(record_id="r", patient_id="p", dataset="icbhi", age=70.0, sex="male", symptoms="cough",
                 audio_type="lung")
    assert record_context(rec) == render_context(rec)
    assert record_context(replace(rec, context="  ")) == render_context(rec)  # blank text: the template
    assert record_context(replace(rec, context="  Own words. ")) == "Own words."


def test_store_lookup_and_record_items(store, wavs):
    proc = InputProcessor(FE, stores=[store])
    vec, why = proc.stored_audio("r1")
    assert why == "" and vec.dtype == np.float32 and vec.shape == (proc.stores[0].dim,)
    np.testing.assert_array_equal(vec, proc.stores[0].get("r1"))
    assert proc.stored_audio("nobody") == (None, "no audio embedding in store")
    task = get_task("T4")
    rec = Record(record_id="r1", patient_id="p1", dataset="icbhi", audio_path=str(wavs[1]), audio_type="lung")
    item, why = proc.record_item(task, rec)
    assert why == "" and item.context == record_context(rec) and item.key == "r1"
    np.testing.assert_array_equal(item.audio, vec)
    assert proc.record_item(task, replace(rec, audio_path="")) == (None, "record has no audio")
    text_only, _ = proc.record_item(task, replace(rec, audio_path=""), use_audio=False)
    assert text_only.audio is None and text_only.context == record_context(rec)


def test_request_items_and_metadata(tmp_path):
    proc = InputProcessor(FE, embed=lambda specs: np.stack([s.mean(0) for s in specs]))
    task = get_task("T4")
    item = proc.request_item(task, symptoms="  dry cough ")
    assert item.context == "dry cough" and item.audio is None and item.key == "input"
    meta = {"age": 72, "sex": "M", "smoker": True, "audio_type": "lung"}
    item = proc.request_item(task, metadata=meta)
    assert item.context == record_context(metadata_to_record(meta)) and item.audio_type == "lung"
    with pytest.raises(ConfigError, match="not both"):
        proc.request_item(task, symptoms="x", metadata=meta)
    with pytest.raises(DataError, match="nothing to predict"):
        proc.request_item(task)
    (tmp_path / "m.json").write_text('{"sex": "female"}')
    assert parse_metadata(str(tmp_path / "m.json")) == {"sex": "female"}
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(DataError, match="not a regular file"):
        parse_metadata(str(tmp_path / "fifo"))
    with pytest.raises(DataError, match="nested too deeply"):
        parse_metadata("{" + '"a":[' * 200 + "]" * 200 + "}")
