"""``respiramfm predict`` on real ICBHI recordings with a tiny model directory built here.

The audio encoder is the tiny OPERA-CT fixture checkpoint (128-d); the model is a
tiny Llama with random LoRA/head values, so probabilities are not meaningful,
but every step (decode, front end, encoder, projector, LLM) is the real one and
each result is checked against an independent computation.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from respiramfm.models.configuration import EncoderInfo, FusionConfig, ProjectorConfig
from respiramfm.models.projector import build_projector
from respiramfm.cli import main
from respiramfm.data.records import Record, write_manifest
from respiramfm.errors import AudioDecodeError, ConfigError, DataError
from respiramfm.models.fusion import RespiraMFM
from respiramfm.fusion.predict import Predictor
from respiramfm.models.processing import metadata_to_record, parse_metadata
from respiramfm.models.sequence import FusionItem


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

WAVS = ["104_1b1_Al_sc_Litt3200.wav", "102_1b1_Ar_sc_Meditron.wav", "101_1b1_Al_sc_Meditron.wav"]
META = {"age": 72, "sex": "M", "smoker": True, "symptoms": ["dry cough", "shortness of breath"],
        "location": "left anterior chest", "audio_type": "lung"}


@pytest.fixture(scope="module")
def encoder_ckpt(opera_fixtures) -> Path:
    return opera_fixtures / "opera_ct_tiny_seed0.safetensors"


@pytest.fixture(scope="module")
def icbhi(shared_data) -> Path:
    return shared_data / "icbhi" / "audio_and_txt_files"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, encoder_ckpt) -> Path:
    from respiramfm.encoders.registry import build_encoder, get_encoder

    enc = build_encoder("opera-ct", str(encoder_ckpt))
    d = tmp_path_factory.mktemp("predict") / "model"
    info = EncoderInfo(name="opera-ct", checkpoint="opera_tiny.safetensors", weights_hash=enc.weights_hash,
                       out_dim=enc.out_dim, frontend=dataclasses.asdict(get_encoder("opera-ct").frontend))
    torch.manual_seed(0)
    proj = build_projector(ProjectorConfig(in_dim=enc.out_dim, hidden=64, out_dim=64, final="layernorm"))
    model = RespiraMFM(FusionConfig(backbone="tiny-llama", encoder=info), proj)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.normal_(0.0, 0.3)
    model.save_pretrained(d)
    shutil.copy(encoder_ckpt, d / "opera_tiny.safetensors")  # recorded relative to the model directory
    return d


@pytest.fixture(scope="module")
def predictor(model_dir) -> Predictor:
    return Predictor.from_pretrained(model_dir)


def _independent_probability(model_dir, encoder_ckpt, wav, context, audio_type="lung"):
    """decode -> front end -> encoder -> model, assembled by hand from the lower-level modules."""
    from respiramfm.audio import FrontendConfig, load, opera_spectrogram
    from respiramfm.encoders.registry import build_encoder

    model = RespiraMFM.from_pretrained(model_dir)
    spec = opera_spectrogram(load(wav, sr=16000), sr=16000, cfg=FrontendConfig())
    emb = build_encoder("opera-ct", str(encoder_ckpt)).encode([spec])[0]
    return float(model.predict_proba([FusionItem(task="T4", audio=emb, context=context, audio_type=audio_type)])[0])


def test_cli_single_recording_with_metadata_and_attribution(model_dir, encoder_ckpt, icbhi, capsys):
    from respiramfm.data.templates import render_context

    wav = icbhi / WAVS[0]
    rc = main(["predict", "--model", str(model_dir), "--audio", str(wav), "--metadata", json.dumps(META),
               "--task", "T4", "--attribution"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"probability", "task", "disease", "modalities_used", "model", "warnings", "attention",
                        "decision", "threshold", "threshold_rule", "trained_on"}
    assert out["decision"] is None and out["threshold_rule"].startswith("no threshold")  # nothing recorded
    assert out["trained_on"]["recorded"] is False
    assert 0.0 <= out["probability"] <= 1.0
    assert (out["task"], out["disease"], out["modalities_used"], out["warnings"]) == \
        ("T4", "COPD", ["audio", "context"], [])
    assert out["model"].startswith("model@")
    context = render_context(metadata_to_record(META))
    assert "dry cough" in context and "Smoking status: smoker." in context and "Gender: male." in context
    expected = _independent_probability(model_dir, encoder_ckpt, wav, context)
    assert out["probability"] == pytest.approx(expected, abs=1e-6)
    att = out["attention"]
    assert att["tokens"] and len(att["tokens"]) == len(att["weights"])
    assert sum(att["weights"]) == pytest.approx(att["context_mass"], rel=1e-6)


def test_missing_modalities_are_reported(predictor, model_dir, encoder_ckpt, icbhi):
    text = predictor.predict(symptoms="fever, cough and fatigue for three days", task="T4")
    assert text["modalities_used"] == ["context"]
    assert any("no audio" in w for w in text["warnings"])
    audio = predictor.predict(audio_path=icbhi / WAVS[1], task="T4")
    assert audio["modalities_used"] == ["audio"] and any("no context" in w for w in audio["warnings"])
    expected = _independent_probability(model_dir, encoder_ckpt, icbhi / WAVS[1], None)
    assert audio["probability"] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(DataError, match="nothing to predict"):
        predictor.predict(task="T4")
    content = predictor.predict(audio=(icbhi / WAVS[1]).read_bytes(), task="T4")  # the same file as bytes
    assert content["probability"] == audio["probability"] and content["modalities_used"] == ["audio"]
    with pytest.raises(ConfigError, match="not both"):
        predictor.predict(audio_path=icbhi / WAVS[1], audio=(icbhi / WAVS[1]).read_bytes(), task="T4")


def test_typed_errors(model_dir, predictor, icbhi, tmp_path, capsys):
    wav = str(icbhi / WAVS[0])
    assert main(["predict", "--model", str(model_dir), "--audio", wav, "--task", "T42"]) == 1
    assert "unknown task 'T42'" in capsys.readouterr().err
    assert main(["predict", "--model", str(model_dir), "--audio", wav, "--metadata", "{age: 3", "--task", "T4"]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 4)
    assert main(["predict", "--model", str(model_dir), "--audio", str(bad), "--task", "T4"]) == 1
    assert str(bad) in capsys.readouterr().err
    with pytest.raises(AudioDecodeError, match="not found"):
        predictor.predict(audio_path=tmp_path / "absent.wav", task="T4")
    assert main(["predict", "--model", str(tmp_path / "nomodel"), "--audio", wav, "--task", "T4"]) == 1
    assert "model directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --symptoms and --metadata are exclusive
        main(["predict", "--model", str(model_dir), "--symptoms", "x", "--metadata", "{}", "--task", "T4"])
    with pytest.raises(ConfigError, match="not both"):
        predictor.predict(symptoms="cough", metadata={"age": 3}, task="T4")


def test_metadata_parsing(tmp_path):
    assert parse_metadata('{"age": 3}') == {"age": 3}
    (tmp_path / "m.json").write_text('{"sex": "female"}')
    assert parse_metadata(str(tmp_path / "m.json")) == {"sex": "female"}
    with pytest.raises(DataError, match="cannot read"):
        parse_metadata(str(tmp_path / "absent.json"))
    with pytest.raises(DataError, match="JSON object"):
        parse_metadata("[1, 2]")
    with pytest.raises(DataError, match="unknown metadata field"):
        metadata_to_record({"agee": 3})
    with pytest.raises(DataError, match="non-negative"):
        metadata_to_record({"age": -4})
    r = metadata_to_record({"age": "45-54", "gender": "other", "smoker": "ex-smoker", "symptoms": "none"})
    assert r.age is None and r.extra == {"age_text": "45-54", "gender_text": "other", "smoking_text": "ex-smoker"}
    assert r.symptoms == "none" and metadata_to_record({"smoker": False}).smoker == "no"


def _manifest(tmp_path: Path, icbhi: Path) -> Path:
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"\x00" * 100)
    recs = [Record(record_id=f"r{i}", patient_id=w[:3], dataset="icbhi", audio_path=str(icbhi / w),
                   audio_type="lung", diagnosis=dx, age=70.0, sex="male", symptoms="none", split="test")
            for i, (w, dx) in enumerate(zip(WAVS, ["copd", "healthy", "urti"]))]
    recs += [Record(record_id="bad", patient_id="900", dataset="icbhi", audio_path=str(corrupt), audio_type="lung"),
             Record(record_id="gone", patient_id="901", dataset="icbhi", audio_path=str(tmp_path / "gone.wav")),
             Record(record_id="textonly", patient_id="902", dataset="icbhi", diagnosis="copd",
                    symptoms="wheeze; dry cough", smoker="yes")]
    return write_manifest(recs, tmp_path / "manifest.csv")


def test_cli_manifest_batch(model_dir, predictor, icbhi, tmp_path, capsys):
    manifest = _manifest(tmp_path, icbhi)
    out = tmp_path / "preds.csv"
    rc = main(["predict", "--model", str(model_dir), "--manifest", str(manifest), "--task", "T4", "--out", str(out),
               "--batch-size", "2"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["predicted"], summary["errors"], summary["records"]) == (4, 2, 6)
    rows = list(csv.DictReader(out.open()))
    errors = list(csv.DictReader(Path(summary["errors_file"]).open(), delimiter="\t"))
    assert [r["record_id"] for r in rows] == ["r0", "r1", "r2", "textonly"]
    assert sorted(e["record_id"] for e in errors) == ["bad", "gone"]  # nothing lost: 4 + 2 = 6
    assert all(e["error"] for e in errors)
    assert [r["label"] for r in rows] == ["1", "0", "", "1"]  # T4: COPD 1, healthy 0, URTI outside the task
    assert rows[3]["modalities_used"] == "context" and "no audio" in rows[3]["warnings"]
    assert rows[0]["modalities_used"] == "audio+context"
    assert not list(tmp_path.glob(".preds.csv*"))  # progress file removed, outputs written atomically
    single = predictor.predict(audio_path=icbhi / WAVS[0], task="T4",
                               metadata={"age": 70, "sex": "male", "symptoms": "none", "audio_type": "lung"})
    assert float(rows[0]["probability"]) == pytest.approx(single["probability"], abs=1e-5)  # batched vs single float rounding


class SimulatedKill(Exception):
    pass


def test_manifest_resumes_after_a_crash(predictor, icbhi, tmp_path, monkeypatch):
    manifest = _manifest(tmp_path, icbhi)
    out = tmp_path / "preds.csv"
    calls = []
    crash_at = [2]
    real = predictor.model.predict_proba

    def flaky(items, batch_size=16):
        calls.append([it.key for it in items])
        if len(calls) == crash_at[0]:
            raise SimulatedKill  # killed after the first batch was written
        return real(items, batch_size=batch_size)

    monkeypatch.setattr(predictor.model, "predict_proba", flaky)
    with pytest.raises(SimulatedKill):
        predictor.predict_manifest(manifest, "T4", out, batch_size=1)
    assert not out.exists() and (tmp_path / ".preds.csv.progress.jsonl").is_file()
    calls.clear()
    crash_at[0] = -1
    summary = predictor.predict_manifest(manifest, "T4", out, batch_size=1)
    assert (summary["predicted"], summary["errors"]) == (4, 2)
    assert ["r0"] not in calls and len(calls) == 3  # r0 came from the progress file
    fresh = tmp_path / "fresh.csv"
    monkeypatch.setattr(predictor.model, "predict_proba", real)
    predictor.predict_manifest(manifest, "T4", fresh, batch_size=1)
    assert out.read_text() == fresh.read_text()  # a resumed run equals an uninterrupted one
