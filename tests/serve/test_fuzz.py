"""A bounded, seeded fuzz of ``POST /predict``: random and malformed multipart bodies never cause a 5xx.

Not a substitute for schema-driven fuzzing; it aims at the parsing layers an
attacker reaches first (multipart framing, field types, sniffed audio headers,
JSON metadata, odd file names). The TestClient re-raises unhandled exceptions,
so a crash fails the test with its traceback.
"""

from __future__ import annotations

import json
import random

from respiramfm.serve.client import encode_multipart

N_CASES = 64
AUDIO_HEADS = [b"RIFF\x10\x00\x00\x00WAVEfmt ", b"OggS\x00\x02", b"fLaC\x00\x00\x00\x22", b"ID3\x03\x00",
               b"\xff\xfb\x90\x64", b"\x1aE\xdf\xa3\x9f\x42\x86\x81\x01", b"\x00\x00\x00\x18ftypM4A ", b"FORM\x00\x00",
               b".snd\x00\x00\x00\x18", b"caff\x00\x01", b""]
TEXTS = ["", " ", "T4", "t4", "T1", "T9", "T0", "T-1", "../../etc/passwd", "\u0000", "\u202e\u00e9\u4e2d\U0001f600",
         "x" * 5000, "{}", "null", "true", "1e309", "NaN", "<script>alert(1)</script>", "T4\r\nX-Injected: 1"]
METAS = ['{"age": 1e309}', '{"age": "NaN"}', '{"age": true}', '{"sex": {"a": 1}}', '{"symptoms": [1, [2]]}',
         '{"smoker": null}', '{"age": 45, "sex": "f"}', '{"' + "k" * 300 + '": 1}', "[" * 2000, '{"a":', "\"str\"",
         '{"symptoms": "' + "cough; " * 400 + '"}', '{"location": "\u0000"}']
NAMES = ["a.wav", "../../../etc/passwd", "..\\..\\x.wav", "", "\u00e9\u4e2d.webm", "a" * 600, "x.wav\x00.txt",
         "/abs/path.wav", "con.wav"]


def _random_audio(rng: random.Random) -> bytes:
    head = rng.choice(AUDIO_HEADS)
    return head + rng.randbytes(rng.choice([0, 3, 40, 700, 4000]))


def _case(rng: random.Random) -> tuple[bytes, str]:
    kind = rng.randrange(8)
    if kind == 0:  # noise with a multipart content type
        return rng.randbytes(rng.randrange(0, 3000)), f"multipart/form-data; boundary={rng.choice(['x', 'abc', ''])}"
    fields = [("task", rng.choice(["T4", "T7", "T9"]))] if rng.random() < 0.7 else []  # reach the deeper layers
    for _ in range(rng.randrange(0, 4)):
        name = rng.choice(["task", "symptoms", "metadata", "attribution", "spectrogram", "audio", "extra", ""])
        value = rng.choice(TEXTS + METAS + ["true", "false", "1", "yes", "off"])
        fields.append((name, value))
    files = [(rng.choice(["audio"] * 6 + ["task", "file"]), rng.choice(NAMES), _random_audio(rng),
              rng.choice(["audio/wav", "text/plain", "", "application/octet-stream"]))
             for _ in range(rng.randrange(0, 3))]
    body, ctype = encode_multipart(fields, files)
    if kind == 1:  # truncated mid-body
        body = body[: rng.randrange(0, max(1, len(body)))]
    elif kind == 2:  # the boundary in the header does not match the body
        ctype = "multipart/form-data; boundary=----not-the-right-one"
    elif kind == 3:  # a wrong content type
        ctype = rng.choice(["application/json", "text/plain", "application/x-www-form-urlencoded", ""])
    return body, ctype


def test_fuzz_predict_never_5xx(client):
    rng = random.Random(20260101)
    statuses = []
    for i in range(N_CASES):
        body, ctype = _case(rng)
        headers = {"content-type": ctype} if ctype else {}
        r = client.post("/predict", content=body, headers=headers)
        statuses.append(r.status_code)
        assert r.status_code < 500, (i, r.status_code, r.text[:300])
        if r.status_code >= 400:
            err = r.json()
            assert set(err) == {"error", "detail", "notice"} and isinstance(err["error"], str), (i, err)
        else:
            assert 0.0 <= r.json()["probability"] <= 1.0
    assert len(set(statuses)) >= 2  # the cases reach more than one outcome
    # a few structured cases that random generation may not hit
    for meta in METAS:
        body, ctype = encode_multipart([("task", "T4"), ("metadata", meta)])
        r = client.post("/predict", content=body, headers={"content-type": ctype})
        assert r.status_code < 500, (meta[:40], r.text[:300])
    for text in TEXTS:
        body, ctype = encode_multipart([("task", text), ("symptoms", text or "cough")])
        r = client.post("/predict", content=body, headers={"content-type": ctype})
        assert r.status_code < 500, (text[:40], r.text[:300])
        json.dumps(r.json())
