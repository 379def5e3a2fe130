"""The HTTP API returns exactly what ``Predictor.predict`` returns for the same recording and context."""

from __future__ import annotations

import base64
import json
import re
import tempfile

import pytest

META = {"age": 72, "sex": "male", "smoker": True, "symptoms": ["dry cough", "wheezing"], "audio_type": "lung"}
SAME = ("probability", "task", "disease", "modalities_used", "model", "warnings")


def _post(client, task="T4", audio=None, name="rec.wav", ctype="audio/wav", **fields):
    data = {"task": task, **{k: (json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in fields.items()}}
    files = {"audio": (name, audio, ctype)} if audio is not None else None
    return client.post("/predict", data=data, files=files)


def test_audio_and_symptoms_equal_predictor(client, predictor, recordings):
    wav = recordings[0]
    r = _post(client, audio=wav.read_bytes(), symptoms="dry cough and fever for three days")
    assert r.status_code == 200, r.text
    got = r.json()
    want = predictor.predict(audio_path=wav, symptoms="dry cough and fever for three days", task="T4")
    assert {k: got[k] for k in SAME} == {k: want[k] for k in SAME}  # bit-identical probability
    assert got["modalities_used"] == ["audio", "context"] and got["warnings"] == []
    assert got["audio"]["format"] == "wav" and got["audio"]["seconds"] == pytest.approx(15.856, abs=1e-3)
    assert "attention" not in got and "spectrogram_png" not in got


def test_metadata_with_attribution_equal_predictor(client, predictor, recordings):
    wav = recordings[7]  # a KAUH recording
    r = _post(client, task="T6", audio=wav.read_bytes(), metadata=META, attribution="true")
    assert r.status_code == 200, r.text
    got = r.json()
    want = predictor.predict(audio_path=wav, metadata=META, task="T6", attribution=True)
    assert {k: got[k] for k in SAME} == {k: want[k] for k in SAME}
    att = got["attention"]
    assert att["tokens"] == want["attention"]["tokens"] and att["weights"] == want["attention"]["weights"]
    assert "".join(t for t in att["tokens"]).find("dry cough, wheezing") >= 0  # the rendered template
    words = att["words"]
    assert "".join(w["text"] for w in words) == "".join(att["tokens"])
    assert all(w["text"][:1].isspace() for w in words[1:])  # each word starts at a space-led token
    assert sum(w["weight"] for w in words) == pytest.approx(att["context_mass"], rel=1e-9)
    assert any(w["text"].strip() == "wheezing." for w in words)


def test_text_only_and_audio_only(client, predictor, recordings):
    text = _post(client, task="T7", symptoms="fever, chills and a wet cough")
    assert text.status_code == 200, text.text
    want = predictor.predict(symptoms="fever, chills and a wet cough", task="T7")
    assert {k: text.json()[k] for k in SAME} == {k: want[k] for k in SAME}
    assert text.json()["modalities_used"] == ["context"] and "audio" not in text.json()
    audio = _post(client, audio=recordings[3].read_bytes(), symptoms="   ")  # blank text = no context
    want = predictor.predict(audio_path=recordings[3], task="T4")
    assert {k: audio.json()[k] for k in SAME} == {k: want[k] for k in SAME}
    assert any("no context" in w for w in audio.json()["warnings"])


def test_format_sniffed_from_content_not_name(client, predictor, recordings, webm_opus, tmp_path):
    webm = webm_opus(recordings[1])
    ref = tmp_path / "upload.webm"
    ref.write_bytes(webm)
    want = predictor.predict(audio_path=ref, symptoms="wheezing", task="T4")
    for name, ctype in [("recording.webm", "audio/webm;codecs=opus"), ("cough.wav", "audio/wav"),
                        ("notes.txt", "text/plain"), ("blob", "application/octet-stream")]:
        r = _post(client, audio=webm, name=name, ctype=ctype, symptoms="wheezing")
        assert r.status_code == 200, (name, r.text)
        assert r.json()["audio"]["format"] == "webm"
        assert r.json()["probability"] == want["probability"]
    wav_as_mp3 = _post(client, audio=recordings[2].read_bytes(), name="x.mp3", ctype="audio/mpeg")
    assert wav_as_mp3.json()["audio"]["format"] == "wav"


def test_spectrogram_png(client, recordings):
    data = recordings[0].read_bytes()
    r = _post(client, audio=data, symptoms="cough", spectrogram="true")
    png = base64.b64decode(r.json()["spectrogram_png"])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    direct = client.post("/spectrogram", files={"audio": ("a.wav", data, "audio/wav")})
    assert direct.status_code == 200 and direct.headers["content-type"] == "image/png"
    assert direct.content == png
    text_only = _post(client, symptoms="cough", spectrogram="true")
    assert "spectrogram_png" not in text_only.json()


def test_health_tasks_openapi(client, predictor):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == predictor.model_id
    assert health["limits"] == {"max_upload_bytes": 20 * 1024 * 1024, "max_seconds": 120.0}
    tasks = client.get("/tasks").json()["tasks"]
    names = [t["name"] for t in tasks]
    from respiramfm.serve.engine import _task_order

    assert names == sorted(predictor.model.tasks, key=_task_order)
    assert [n for n in names if n in {f"T{i}" for i in range(1, 10)}] == [f"T{i}" for i in range(1, 10)]
    t4 = next(t for t in tasks if t["name"] == "T4")
    assert (t4["disease"], t4["role"]) == ("COPD", "supervised") and t4["description"]
    assert {t["role"] for t in tasks} <= {"supervised", "zero-shot"}
    schema = client.get("/openapi.json").json()
    assert {"/predict", "/spectrogram", "/tasks", "/health"} <= set(schema["paths"])
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]
    form = body["multipart/form-data"]["schema"]
    if "$ref" in form:
        form = schema["components"]["schemas"][form["$ref"].rsplit("/", 1)[1]]
    assert {"audio", "task", "symptoms", "metadata", "attribution", "spectrogram"} <= set(form["properties"])
    assert client.get("/docs").status_code == 404  # the docs UI would load scripts from a CDN


def test_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "not a diagnosis" in page.text and "Research tool" in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    for asset in ("/static/app.js", "/static/style.css"):
        r = client.get(asset)
        assert r.status_code == 200 and len(r.content) > 500
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), "external reference in the page"


def test_uploads_leave_no_files(client, recordings, model_dir, shared_data, tmp_path, monkeypatch):
    """Uploads are decoded in memory; the form parser's spool (over 1 MB) lives only in the temporary directory.

    Nothing may remain there after the request, and the model directory is never written.
    """
    spool = tmp_path / "spool"
    spool.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(spool))
    before = sorted(p.name for p in model_dir.rglob("*"))
    big = shared_data / "icbhi" / "audio_and_txt_files" / "101_1b1_Al_sc_Meditron.wav"
    r = _post(client, audio=big.read_bytes(), symptoms="cough")
    assert r.status_code == 200 and r.json()["audio"]["seconds"] == pytest.approx(20.0, abs=0.01)
    bad = _post(client, audio=b"RIFF" + bytes(2_000_000), symptoms="cough")
    assert bad.status_code == 400
    assert list(spool.iterdir()) == []
    assert sorted(p.name for p in model_dir.rglob("*")) == before
