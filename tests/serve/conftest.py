"""One tiny model directory, one app and one live uvicorn server per test session.

The model is the real pipeline at test size (tiny OPERA-CT fixture encoder, tiny
Llama with the SmolLM2 tokenizer) with random weights, built by
:func:`respiramfm.serve.tiny.build_tiny_model`; the recordings are real ICBHI and
KAUH files from ../shared/data.
"""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="serving needs fastapi (pip install fastapi uvicorn python-multipart)")
pytest.importorskip("uvicorn", reason="serving needs uvicorn")
pytest.importorskip("multipart", reason="serving needs python-multipart")

ICBHI_SMALL = ["104_1b1_Al_sc_Litt3200.wav", "104_1b1_Ar_sc_Litt3200.wav", "104_1b1_Ll_sc_Litt3200.wav",
               "104_1b1_Lr_sc_Litt3200.wav", "104_1b1_Pl_sc_Litt3200.wav", "104_1b1_Pr_sc_Litt3200.wav"]


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Every serving test runs on one torch thread (``one_thread`` is in tests/conftest.py)."""


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, opera_fixtures) -> Path:
    from respiramfm.serve.tiny import build_tiny_model

    encoder = opera_fixtures / "opera_ct_tiny_seed0.safetensors"
    return build_tiny_model(tmp_path_factory.mktemp("serve") / "model", encoder)


@pytest.fixture(scope="session")
def app(model_dir):
    from respiramfm.serve.app import create_app

    return create_app(model_dir)


@pytest.fixture(scope="session")
def predictor(app):
    """The app's own loaded predictor (the reference answers come from Predictor.predict on files)."""
    return app.state.engine.predictor


@pytest.fixture(scope="session")
def client(app):
    from fastapi.testclient import TestClient

    return TestClient(app)


@pytest.fixture(scope="session")
def live_server(app):
    from respiramfm.serve.app import running_server

    with running_server(app) as url:
        yield url


@pytest.fixture(scope="session")
def recordings(shared_data) -> list[Path]:
    """Twelve real recordings: six short ICBHI (4 kHz Littmann) and six KAUH files."""
    icbhi = [shared_data / "icbhi" / "audio_and_txt_files" / n for n in ICBHI_SMALL]
    kauh = sorted((shared_data / "kauh" / "AudioFiles").glob("*.wav"))[:6]
    files = icbhi + kauh
    for f in files:
        if not f.is_file():
            pytest.skip(f"missing recording {f.name} in ../shared/data")
    return files


def _webm_opus(path: Path, seconds: float = 3.0) -> bytes:
    """A real recording re-encoded in memory as webm/opus, as a browser's MediaRecorder uploads it."""
    from respiramfm.audio import load

    y = load(path, sr=48000)[: int(seconds * 48000)].astype(np.float32)
    buf = io.BytesIO()
    with av.open(buf, "w", format="webm") as out:
        stream = out.add_stream("libopus", rate=48000, layout="mono")
        frame = av.AudioFrame.from_ndarray(y[None, :], format="fltp", layout="mono")
        frame.sample_rate = 48000
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            out.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="session")
def webm_opus():
    """``webm_opus(path, seconds=3.0) -> bytes``: a recording as MediaRecorder would upload it."""
    return _webm_opus
