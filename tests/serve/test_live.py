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
from respiramfm.serve.app import ServerLimits, create_app, running_server
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



def _start_server(model_dir, timeout: float = 100.0) -> tuple[subprocess.Popen, str]:
    """``respiramfm serve --port 0`` in a subprocess; returns it and its base URL once Uvicorn says so."""
    proc = subprocess.Popen([sys.executable, "-m", "respiramfm.cli", "serve", "--model", str(model_dir), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base, deadline, lines = None, time.monotonic() + timeout, []
    while base is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"Uvicorn running on (http://127\.0\.0\.1:\d+)", line)
        base = m.group(1) if m else None
    if base is None:
        proc.kill()
        proc.wait(10)
    assert base, "".join(lines)
    return proc, base

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
    assert main(["serve", "--model", str(tmp_path), "--max-connections", "0"]) == 1
    assert "server limit max_connections must be positive" in capsys.readouterr().err
    assert main(["serve", "--model", str(tmp_path), "--header-timeout", "-1"]) == 1
    assert "server limit header_timeout must be positive" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_cli_serves(model_dir, recordings):
    """``respiramfm serve --port 0`` in a subprocess: starts, answers, shuts down gracefully on SIGTERM."""
    proc, base = _start_server(model_dir)
    try:
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


# ---------------------------------------------------------------------- issue 17: slow, idle and hostile clients
FAST_LIMITS = ServerLimits(header_timeout=1.0, body_timeout=2.0, body_idle_timeout=1.0, keep_alive_timeout=1.0,
                           max_connections=4)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Read until the server closes the connection; (closed in time, what it sent)."""
    sock.settimeout(0.25)
    got, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except socket.timeout:
            continue
        except ConnectionResetError:
            return True, got
        if not data:
            return True, got
        got += data
    return False, got


def test_idle_slow_header_and_slow_body_connections_are_closed(predictor):
    app = create_app(predictor=predictor, server_limits=FAST_LIMITS)
    with running_server(app, limits=FAST_LIMITS) as base:
        u = urlsplit(base)
        addr = (u.hostname, u.port)
        with socket.create_connection(addr) as idle, socket.create_connection(addr) as slow_head, \
                socket.create_connection(addr) as slow_body, socket.create_connection(addr) as keep:
            slow_head.sendall(b"GET /health HTTP/1.1\r\nHo")
            slow_body.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=z\r\n"
                              b"Content-Length: 5000\r\n\r\n--z\r\n")
            keep.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            t0 = time.monotonic()
            for s in (idle, slow_head):
                closed, sent = _closed_within(s, 4.0)
                assert closed and sent == b"", sent[:200]
            closed, sent = _closed_within(slow_body, 4.0)
            assert closed and sent.startswith(b"HTTP/1.1 408"), sent[:300]
            assert json.loads(sent.split(b"\r\n\r\n", 1)[1])["error"] == "request_timeout"
            closed, sent = _closed_within(keep, 4.0)  # answered, then closed when idle
            assert closed and sent.startswith(b"HTTP/1.1 200") and b'"notice"' in sent, sent[:300]
            assert time.monotonic() - t0 < 8.0
        status, body = get_json(base + "/health")
        assert status == 200 and body["status"] == "ok"


def test_connection_cap(predictor):
    limits = ServerLimits(header_timeout=6.0, max_connections=4)
    with running_server(create_app(predictor=predictor), limits=limits) as base:
        u = urlsplit(base)
        held = [socket.create_connection((u.hostname, u.port)) for _ in range(4)]
        try:
            time.sleep(0.3)
            with socket.create_connection((u.hostname, u.port)) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                closed, sent = _closed_within(extra, 3.0)
                assert closed and sent == b"", sent[:200]  # over the cap: closed unanswered
        finally:
            for s in held:
                s.close()
        time.sleep(0.3)
        assert get_json(base + "/health")[0] == 200  # a freed slot is usable again


def _vm_kib(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status", encoding="ascii"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


RSS_BOUND_MIB = 400  # peak RSS growth allowed while 8 decode bombs arrive at once


@pytest.mark.timeout(300)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the peak RSS")
def test_eight_bombs_at_once_keep_server_rss_bounded(model_dir, recordings):
    """``respiramfm serve`` in a subprocess: 8 concurrent bombs, all 4xx, peak RSS (VmHWM) within the bound."""
    from testkit.bombs import bombs

    payloads = bombs()
    proc, base = _start_server(model_dir)
    try:
        warm = post_form(base + "/predict", [("task", "T4"), ("symptoms", "cough")],
                         [("audio", "a.wav", recordings[0].read_bytes(), "audio/wav")])
        assert warm[0] == 200
        with open(f"/proc/{proc.pid}/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # reset the peak (VmHWM) to the current RSS: the model load's peak is not counted
        before = _vm_kib(proc.pid, "VmRSS")
        with ThreadPoolExecutor(max_workers=8) as pool:
            answers = list(pool.map(lambda kv: post_form(base + "/predict", [("task", "T4")],
                                                         [("audio", kv[0], kv[1], "audio/wav")], timeout=120),
                                    payloads.items()))
        peak = _vm_kib(proc.pid, "VmHWM")
        for (name, _), (status, body) in zip(payloads.items(), answers):
            assert 400 <= status < 500 and body["notice"], (name, status, body)
        growth_mib = (peak - before) / 1024
        print(f"8 bombs at once: RSS {before / 1024:.0f} MiB before, peak +{growth_mib:.0f} MiB")
        assert growth_mib < RSS_BOUND_MIB, f"peak RSS grew by {growth_mib:.0f} MiB (from {before / 1024:.0f} MiB)"
        assert post_form(base + "/predict", [("task", "T4"), ("symptoms", "cough")])[0] == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
