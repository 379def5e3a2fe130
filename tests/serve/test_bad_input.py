"""Every kind of bad request gets a 4xx JSON ``{"error", "detail", "notice"}``; nothing is served from disk but the page.

The TestClient re-raises any exception the app does not handle, so a bug here
fails the test instead of hiding behind a 500.
"""

from __future__ import annotations

import io
import json
import time

import pytest
import soundfile as sf
from fastapi.testclient import TestClient

from respiramfm.serve.app import create_app
from respiramfm.serve.guards import NOTICE
from testkit.bombs import bombs, one_sample_wav, silent_wav, wav_declaring_rate


def _post(client, fields=None, audio=None, name="rec.wav"):
    files = {"audio": (name, audio, "audio/wav")} if audio is not None else None
    return client.post("/predict", data=fields or {}, files=files)


def _err(r, status, error=None, match=None):
    assert r.status_code in (status if isinstance(status, tuple) else (status,)), r.text
    body = r.json()
    assert set(body) == {"error", "detail", "notice"}, body
    assert body["notice"] == NOTICE, body
    if error is not None:
        assert body["error"] == error, body
    if match is not None:
        assert match in json.dumps(body["detail"]), body
    return body


@pytest.fixture(scope="module")
def strict(predictor):
    """Same loaded model, small limits: 0.1 MiB uploads, 5-s recordings."""
    return TestClient(create_app(predictor=predictor, max_upload_mb=0.1, max_seconds=5.0))


def test_bad_audio(client, recordings):
    wav = recordings[0].read_bytes()
    _err(_post(client, {"task": "T4"}, b"this is not audio at all " * 20, "cough.wav"), 400, "undecodable_audio",
         "cough.wav")
    _err(_post(client, {"task": "T4"}, wav[:5000]), 400, "undecodable_audio", "truncated")
    _err(_post(client, {"task": "T4"}, b""), 400, "empty_audio", "empty")
    _err(_post(client, {"task": "T4"}, b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 4), 400, "undecodable_audio")
    nan = bytearray(wav)
    nan[44:44 + 4000] = b"\xff" * 4000  # still decodable 16-bit PCM: a loud burst, not an error
    assert _post(client, {"task": "T4"}, bytes(nan)).status_code == 200
    # a file field sent as plain text
    _err(client.post("/predict", data={"task": "T4", "audio": "abc"}), 422, "invalid_request", "audio")


def test_limits(strict, recordings, shared_data):
    small = recordings[1].read_bytes()  # 205 kB: past the 0.1 MiB file limit, within the body allowance
    assert 0.1 * 2**20 < len(small) < 0.1 * 2**20 + 256 * 1024
    _err(_post(strict, {"task": "T4"}, small), 413, "audio_too_large")
    big = (shared_data / "icbhi" / "audio_and_txt_files" / "101_1b1_Al_sc_Meditron.wav").read_bytes()
    _err(_post(strict, {"task": "T4"}, big), 413, "request_too_large")  # refused from Content-Length
    long = recordings[8].read_bytes()  # a 12.5-s KAUH recording of 100 kB
    _err(_post(strict, {"task": "T4"}, long), 413, "audio_too_long", "5 s")
    assert strict.get("/health").json()["limits"] == {"max_upload_bytes": 104857, "max_seconds": 5.0}
    y, sr = sf.read(io.BytesIO(long), dtype="int16")
    buf = io.BytesIO()
    sf.write(buf, y[: 4 * sr], sr, format="WAV", subtype="PCM_16")  # the first 4 s of the same recording
    assert _post(strict, {"task": "T4", "symptoms": "cough"}, buf.getvalue()).status_code == 200


def test_bad_fields(client, recordings):
    wav = recordings[0].read_bytes()
    _err(_post(client, {"task": "T42", "symptoms": "cough"}), 400, "unknown_task", "T42")
    _err(_post(client, {"task": "  ", "symptoms": "cough"}), 400, "missing_task")
    _err(_post(client, {"symptoms": "cough"}), 422, "invalid_request", "task")
    _err(_post(client, {"task": "T4", "metadata": "{age: 3"}), 400, "bad_metadata", "not valid JSON")
    _err(_post(client, {"task": "T4", "metadata": "[1, 2]"}), 400, "bad_metadata", "JSON object")
    _err(_post(client, {"task": "T4", "metadata": '{"agee": 3}'}), 400, "bad_metadata", "unknown metadata field")
    _err(_post(client, {"task": "T4", "metadata": '{"age": -3}'}), 400, "bad_metadata", "non-negative")
    # a *.json value is never opened as a file (the CLI's parse_metadata would do that)
    _err(_post(client, {"task": "T4", "metadata": "config.json"}), 400, "bad_metadata", "not valid JSON")
    _err(_post(client, {"task": "T4", "metadata": "[" * 5000}), 400, "bad_metadata", "nested too deeply")
    _err(_post(client, {"task": "T4", "metadata": '{"symptoms": "' + "x" * 20000 + '"}'}), 400, "bad_metadata",
         "longer than")
    _err(_post(client, {"task": "T4", "symptoms": "cough", "metadata": '{"age": 3}'}), 400, "conflicting_input")
    _err(_post(client, {"task": "T4"}), 400, "no_input")
    _err(_post(client, {"task": "T4", "symptoms": " \n ", "metadata": ""}), 400, "no_input")
    _err(_post(client, {"task": "T4", "metadata": "{}"}), 400, "no_input")
    _err(_post(client, {"task": "T4", "attribution": "maybe"}, wav), 422, "invalid_request", "attribution")
    _err(client.post("/predict", json={"task": "T4", "symptoms": "cough"}), 422, "invalid_request")
    _err(client.post("/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}),
         (400, 422))
    _err(client.post("/spectrogram", files={"audio": ("a.wav", b"\x00" * 300, "audio/wav")}), 400,
         "undecodable_audio")
    _err(client.post("/spectrogram"), 422, "invalid_request")


def test_routes_and_traversal(client):
    _err(client.get("/nothing-here"), 404, "not_found")
    _err(client.get("/predict"), 405, "method_not_allowed")
    _err(client.delete("/tasks"), 405)
    assert client.get("/static/app.js").status_code == 200
    for url in ["/static/../../etc/passwd", "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
                "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd", "/static/..%2fapp.py", "/static/../app.py",
                "/static//etc/passwd", "/static/%2fetc%2fpasswd", "/static/..\\..\\app.py", "/static/",
                "/static", "/..%2f..%2fetc%2fpasswd", "/static/app.js%00.png"]:
        r = client.get(url)
        assert r.status_code in (404, 400), (url, r.status_code)
        assert b"root:" not in r.content and b"import" not in r.content, url


# ---------------------------------------------------------------------- issue 17: hardening
def test_research_notice_in_every_json_answer(client):
    for r in (client.get("/health"), client.get("/tasks"), _post(client, {"task": "T4", "symptoms": "cough"}),
              _post(client, {"task": "T42", "symptoms": "cough"}), client.get("/nothing-here")):
        assert r.json()["notice"] == NOTICE, r.text
    assert r.status_code == 404 and _post(client, {"task": "T4", "symptoms": "cough"}).status_code == 200


def test_decode_bombs_are_refused_cheaply(client):
    """Header-declared bombs cost nothing; lying headers stop at the decoded-samples budget (no 5xx)."""
    for name, data in bombs().items():
        t0 = time.perf_counter()
        r = _post(client, {"task": "T4"}, data, name)
        body = _err(r, (400, 413, 422))
        assert time.perf_counter() - t0 < 20, name
        assert body["error"] in ("undecodable_audio", "audio_too_long", "no_audio_content"), (name, body)
        assert any(k in body["detail"] for k in ("above the maximum of 384000 Hz", "decoded-samples budget",
                                                 "longer than", "silent")), (name, body)


def test_nothing_to_hear_is_refused(client):
    _err(_post(client, {"task": "T4"}, one_sample_wav()), 422, "no_audio_content", "too short to score")
    _err(_post(client, {"task": "T4", "symptoms": "cough"}, silent_wav(3.0)), 422, "no_audio_content", "silent")
    _err(_post(client, {"task": "T4"}, wav_declaring_rate(2_147_483_647)), 400, "undecodable_audio",
         "2147483647 Hz is above the maximum")
    _err(client.post("/spectrogram", files={"audio": ("s.wav", silent_wav(1.0), "audio/wav")}), 422,
         "no_audio_content")


def test_metadata_bombs_are_fast_4xx(client):
    """Nested values render in linear time with limits; deep JSON, huge numbers and long lists are 400s."""
    def nested(depth):
        v = "x" * 65
        for _ in range(depth):
            v = [v]
        return json.dumps({"symptoms": v})

    t0 = time.perf_counter()
    _err(_post(client, {"task": "T4", "metadata": nested(24)}), 400, "bad_metadata", "nested more than 4 lists")
    for depth in (400, 500, 600):
        _err(_post(client, {"task": "T4", "metadata": nested(depth)}), 400, "bad_metadata", "nested too deeply")
    _err(_post(client, {"task": "T4", "metadata": '{"age": ' + "9" * 5000 + "}"}), 400, "bad_metadata",
         "non-negative number")
    _err(_post(client, {"task": "T4", "metadata": '{"age": "' + "9" * 5000 + '"}'}), 400, "bad_metadata",
         "non-negative number")
    _err(_post(client, {"task": "T4", "metadata": json.dumps({"symptoms": ["a"] * 300})}), 400, "bad_metadata",
         "more than 256 items")
    assert time.perf_counter() - t0 < 30
    ok = _post(client, {"task": "T4", "metadata": json.dumps({"symptoms": ["cough", ["fever", []]], "age": 7})})
    assert ok.status_code == 200, ok.text


def test_origin_and_host_policy(predictor):
    app = create_app(predictor=predictor, allowed_hosts=["127.0.0.1", "localhost"],
                     allowed_origins=["http://lab.example:9000"])
    c = TestClient(app, base_url="http://127.0.0.1:8000")
    form = {"task": "T4", "symptoms": "cough"}
    for origin in ("http://evil.example", "null", "http://127.0.0.1:8001", "https://127.0.0.1:8000"):
        _err(c.post("/predict", data=form, headers={"origin": origin}), 403, "forbidden_origin")
    for origin in ("http://127.0.0.1:8000", "http://lab.example:9000", None):
        headers = {"origin": origin} if origin else {}
        assert c.post("/predict", data=form, headers=headers).status_code == 200, origin
    r = c.get("/health", headers={"origin": "http://evil.example"})  # readable only by the same origin:
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers  # no CORS header
    _err(c.get("/health", headers={"host": "evil.example:8000"}), 400, "forbidden_host")
    _err(c.post("/predict", data=form, headers={"host": "rebound.example:8000",
                                                 "origin": "http://rebound.example:8000"}), 400, "forbidden_host")
    assert c.get("/health", headers={"host": "localhost:8000"}).status_code == 200


def test_redirects_are_relative(client):
    for host in ("evil.example", "testserver"):
        r = client.get("/static", headers={"host": host}, follow_redirects=False)
        assert r.status_code in (307, 308) and r.headers["location"] == "/static/", r.headers
        r = client.get("/tasks/", headers={"host": host}, follow_redirects=False)
        assert r.status_code in (307, 308) and r.headers["location"] == "/tasks", r.headers
