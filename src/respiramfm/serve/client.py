"""A minimal multipart/form-data client on the standard library (for scripts, tests and the benchmark).

``requests``/``httpx`` would do, but neither is a dependency of the package, and
the API is simple enough that a few lines of ``urllib`` cover it. Fields may be
repeated and files carry their own name and content type, so malformed requests
(wrong types, odd names, duplicate fields) can be sent on purpose.
"""

from __future__ import annotations

import json
import secrets
import urllib.error
import urllib.request
from typing import Iterable


def encode_multipart(fields: Iterable[tuple[str, str]] = (),
                     files: Iterable[tuple[str, str, bytes, str]] = ()) -> tuple[bytes, str]:
    """``fields`` (name, value) and ``files`` (name, filename, data, content type) -> (body, Content-Type)."""
    boundary = "----respiramfm" + secrets.token_hex(12)
    parts: list[bytes] = []
    for name, value in fields:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                     + str(value).encode() + b"\r\n")
    for name, filename, data, ctype in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: {ctype}\r\n\r\n".encode() + bytes(data) + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def post(url: str, body: bytes, content_type: str, timeout: float = 120.0) -> tuple[int, bytes, dict]:
    """POST raw bytes; returns (status, body, headers) for 2xx and error statuses alike."""
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def post_form(url: str, fields: Iterable[tuple[str, str]] = (), files: Iterable[tuple[str, str, bytes, str]] = (),
              timeout: float = 120.0) -> tuple[int, dict]:
    """POST a multipart form and decode the JSON answer: (status, body dict)."""
    body, ctype = encode_multipart(fields, files)
    status, data, _ = post(url, body, ctype, timeout)
    return status, json.loads(data)


def get_json(url: str, timeout: float = 30.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


__all__ = ["encode_multipart", "get_json", "post", "post_form"]
