"""A real uvicorn server on 127.0.0.1 (ephemeral port): concurrency, raw HTTP, streamed bodies, the CLI."""

from __future__ import annotations

import json
import re
import select
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest

from respiramfm.cli import main
from respiramfm.serve.app import create_app, running_server
from respiramfm.serve.client import get_json, post_form

SYMPTOMS = ["dry cough", "wheezing and shortness of breath", "fever, chills", "sore throat and runny nose",
            "tightness in the chest", "no symptoms", "wet cough for two weeks", "fatigue and headache"]


def _requests(recordings) -> list[dict]:
    """Twenty different inputs: recordings, tasks, symptoms, metadata, text-only, with/without attribution."""
    reqs = []
    for i in range(20):
        fields = [("task", ["T4", "T5", "T6", "T7", "T8"][i % 5])]
        if i % 4 == 3:
            fields.append(("metadata", json.dumps({"age": 30 + i, "sex": "female" if i % 2 else "male",
                                                   "symptoms": SYMPTOMS[i % 8].split(" and ")})))
        elif i % 7 != 6:
            fields.append(("symptoms", SYMPTOMS[i % 8]))
        if i % 3 == 0:
            fields.append(("attribution", "true"))
        files = [] if i % 9 == 8 else [("audio", recordings[i % len(recordings)].name,
                                        recordings[i % len(recordings)].read_bytes(), "audio/wav")]
        reqs.append({"fields": fields, "files": files})
    return reqs


def test_twenty_concurrent_requests_match_sequential(live_server, recordings):
    url = live_server + "/predict"
    reqs = _requests(recordings)

    def send(req):
        return post_form(url, req["fields"], req["files"], timeout=300)

    sequential = [send(r) for r in reqs]
    assert all(status == 200 for status, _ in sequential), sequential
    assert len({body["probability"] for _, body in sequential}) == 20  # the inputs really differ
    with ThreadPoolExecutor(max_workers=20) as pool:
        concurrent = list(pool.map(send, reqs))
    for i, (seq, conc) in enumerate(zip(sequential, concurrent)):
        assert conc == seq, f"request {i} differs under concurrency"
    assert sum("attention" in body for _, body in concurrent) == 7


def _raw(base: str, request: bytes) -> bytes:
    u = urlsplit(base)
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(request)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def test_raw_path_traversal(live_server):
    """Literal ``..`` segments, which HTTP client libraries would normalise away before sending."""
    for path in ["/static/../../../../etc/passwd", "/static/../app.py", "/static/../../respiramfm/cli.py",
                 "/static/..%2f..%2f..%2fetc/passwd", "/static/./../engine.py", "/../../etc/passwd"]:
        resp = _raw(live_server, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status = int(resp.split(b" ", 2)[1])
        assert status in (400, 404), (path, resp[:200])
        assert b"root:" not in resp and b"import " not in resp, path
    ok = _raw(live_server, b"GET /static/style.css HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200")


def test_streamed_body_over_limit_is_cut_off(predictor, recordings):
    """A chunked body (no Content-Length) is counted as it arrives and refused at the limit."""
    app = create_app(predictor=predictor, max_upload_mb=0.05)
    limit = int(0.05 * 2**20) + 256 * 1024
    with running_server(app) as base:
        u = urlsplit(base)
        with socket.create_connection((u.hostname, u.port), timeout=30) as s:
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      b"Content-Type: multipart/form-data; boundary=zz\r\n\r\n")
            head = b'--zz\r\nContent-Disposition: form-data; name="audio"; filename="a.wav"\r\n\r\n'
            resp = b""
            try:
                for chunk in [head] + [b"\x01" * 65536] * (limit // 65536 + 8):
                    s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    if select.select([s], [], [], 0.05)[0]:
                        break  # the server has answered: stop sending
                time.sleep(0.2)
                while data := s.recv(65536):
                    resp += data
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server closes the connection once it has answered (unread input: reset)
        assert resp.startswith(b"HTTP/1.1 413"), resp[:300]
        body = resp.split(b"\r\n\r\n", 1)[1]
        assert not body or json.loads(body)["error"] == "request_too_large"
        status, body = post_form(base + "/predict", [("task", "T4"), ("symptoms", "cough")])
        assert status == 200  # the server is still fine


def test_cli_errors(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "absent")]) == 1
    assert "model directory not found" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--max-seconds", "0"]) == 1
    assert "must be positive" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_cli_serves(model_dir, recordings):
    """``respiramfm serve --port 0`` in a subprocess: starts, answers, shuts down gracefully on SIGTERM."""
    proc = subprocess.Popen([sys.executable, "-m", "respiramfm.cli", "serve", "--model", str(model_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base, deadline, lines = None, time.monotonic() + 100, []
        while base is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
            base = m.group(1) if m else None
        assert base, "".join(lines)
        status, health = get_json(base + "/health")
        assert status == 200 and health["model"].startswith("model@")
        status, body = post_form(base + "/predict", [("task", "T4"), ("symptoms", "cough")],
                                 [("audio", "a.wav", recordings[0].read_bytes(), "audio/wav")])
        assert status == 200 and 0 <= body["probability"] <= 1
    finally:
        proc.terminate()
        rest, _ = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully, then re-raises the captured SIGTERM, so the exit status is -15
    assert proc.returncode in (0, -15) and "Finished server process" in rest, rest
