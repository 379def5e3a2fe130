"""``respiramfm serve``: an HTTP prediction API and a web page for one saved model.

The app is built by :func:`create_app` (a factory, so tests can build one per
session); the model is loaded once, when the app is created, and shared by all
requests (see :mod:`respiramfm.serve.engine` for why inference runs under a lock).

Endpoints: ``POST /predict`` (multipart: ``audio`` file, ``task``, ``symptoms`` or
``metadata``, optional ``attribution`` / ``spectrogram`` flags), ``POST
/spectrogram`` (PNG of the model's input), ``GET /tasks``, ``GET /health``, the
OpenAPI schema at ``/openapi.json``, and the page at ``/`` with its assets under
``/static/`` -- the only files the server ever reads from disk after start-up.

Every refused request gets a 4xx JSON body ``{"error": code, "detail": text}``.
The interactive ``/docs`` pages are switched off: they load scripts from a CDN,
and nothing this server sends may reach outside the machine. A strict
Content-Security-Policy makes browsers enforce that for the page too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from respiramfm import __version__
from respiramfm.errors import RespiraMFMError
from respiramfm.serve.engine import (DEFAULT_MAX_SECONDS, DEFAULT_MAX_UPLOAD_MB, Engine, InputError, Limits,
                                     ServePredictor)

STATIC_DIR = Path(__file__).resolve().parent / "static"
FORM_OVERHEAD = 256 * 1024  # room for the text fields and multipart framing next to the audio
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
log = logging.getLogger("respiramfm.serve")


# ---------------------------------------------------------------------- response models (OpenAPI)
class Word(BaseModel):
    text: str
    weight: float


class Attention(BaseModel):
    tokens: list[str]
    weights: list[float]
    context_mass: float
    layers: int
    words: list[Word] = []


class AudioInfo(BaseModel):
    name: str
    format: str
    seconds: float


class Prediction(BaseModel):
    model_config = ConfigDict(extra="allow")  # new Predictor fields pass through unchanged
    probability: float
    task: str
    disease: str
    modalities_used: list[str]
    model: str
    warnings: list[str]
    attention: Attention | None = None
    audio: AudioInfo | None = None
    spectrogram_png: str | None = None


class ErrorBody(BaseModel):
    error: str
    detail: Any


ERRORS = {400: {"model": ErrorBody}, 413: {"model": ErrorBody}, 422: {"model": ErrorBody}}


# ---------------------------------------------------------------------- ASGI middleware
async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with a JSON 413, before they are parsed or spooled.

    (FastAPI's own ``max_body_size`` answers some of these cases with a plain-text
    413; every refusal of this API is JSON, so the limit is enforced here.)

    A declared Content-Length is checked up front; a chunked body is counted as
    it arrives and cut off at the limit (the app then sees a disconnect, and
    whatever it answers is replaced by the 413).
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_big = {"error": "request_too_large", "detail": f"request body exceeds {self.max_bytes} bytes"}
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                n = int(declared)
            except ValueError:
                return await _send_json(send, 400, {"error": "bad_request", "detail": "invalid Content-Length"})
            if n > self.max_bytes:
                return await _send_json(send, 413, too_big)
        state = {"seen": 0, "over": False, "started": False}

        async def counted_receive():
            if state["over"]:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                state["seen"] += len(msg.get("body", b""))
                if state["seen"] > self.max_bytes:
                    state["over"] = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            if state["over"]:
                if not state["started"]:
                    state["started"] = True
                    await _send_json(send, 413, too_big)
                return
            if msg["type"] == "http.response.start":
                state["started"] = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not state["over"]:
                raise
        if state["over"] and not state["started"]:
            await _send_json(send, 413, too_big)


class SecurityHeaders:
    """CSP (no external resources, no inline script), no MIME sniffing, no framing."""

    HEADERS = [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
               (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(msg):
            if msg["type"] == "http.response.start":
                msg = {**msg, "headers": list(msg.get("headers") or []) + self.HEADERS}
            await send(msg)

        await self.app(scope, receive, with_headers)


# ---------------------------------------------------------------------- app
def _slug(status: int) -> str:
    return {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
        status, f"http_{status}")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    async def _input(_req, exc: InputError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        detail = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        return JSONResponse({"error": "invalid_request", "detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        return JSONResponse({"error": _slug(exc.status_code), "detail": str(exc.detail)},
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RespiraMFMError)
    async def _ours(_req, exc: RespiraMFMError):
        return JSONResponse({"error": "bad_input", "detail": exc.cause}, status_code=400)

    @app.exception_handler(Exception)
    async def _bug(_req, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse({"error": "internal_error", "detail": type(exc).__name__}, status_code=500)


async def _read_upload(audio: UploadFile | None, limits: Limits) -> tuple[bytes | None, str | None]:
    if audio is None:
        return None, None
    data = await audio.read(limits.max_upload_bytes + 1)
    return data, audio.filename


def create_app(model_dir: str | Path | None = None, *, predictor=None, device: str = "cpu",
               encoder_checkpoint: str | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_seconds: float = DEFAULT_MAX_SECONDS) -> FastAPI:
    """The FastAPI app for one model (a saved directory, or an already loaded Predictor)."""
    if (model_dir is None) == (predictor is None):
        raise ValueError("give exactly one of model_dir and predictor")
    if predictor is None:
        predictor = ServePredictor.from_pretrained(model_dir, device=device, encoder_checkpoint=encoder_checkpoint)
    limits = Limits(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_seconds=float(max_seconds))
    engine = Engine(predictor, limits)

    app = FastAPI(title="RespiraMFM", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json",
                  description="Research prototype: probability of a respiratory condition from a recording and "
                              "symptom text. Not a medical device; not a diagnosis.")
    app.state.engine = engine
    task_names = [t["name"] for t in engine.tasks()]  # documented in the schema; checked by the engine
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes + FORM_OVERHEAD)
    app.add_middleware(SecurityHeaders)
    _install_error_handlers(app)

    @app.get("/health", summary="model identity and limits")
    def health() -> dict:
        return engine.info()

    @app.get("/tasks", summary="the tasks this model can score")
    def tasks() -> dict:
        return {"tasks": engine.tasks()}

    @app.post("/predict", response_model=Prediction, response_model_exclude_none=True, responses=ERRORS,
              summary="probability that the task's condition is present")
    async def predict(
        task: str = Form(description="task name, e.g. T4 (see GET /tasks)",  # a default, not an annotation:
                         json_schema_extra={"enum": task_names}),            # evaluated here, where task_names is
        audio: Annotated[UploadFile | None, File(description="recording (wav, flac, ogg, mp3, webm/opus...); "
                                                             "the format is read from the content")] = None,
        symptoms: Annotated[str | None, Form(description="free-text symptoms, used as written")] = None,
        metadata: Annotated[str | None, Form(description="patient metadata as a JSON object (instead of "
                                                         "symptoms): age, sex, symptoms, smoker...")] = None,
        attribution: Annotated[bool, Form(description="add the attention over the context words")] = False,
        spectrogram: Annotated[bool, Form(description="add a PNG (base64) of the input spectrogram")] = False,
    ) -> dict:
        data, name = await _read_upload(audio, engine.limits)
        return await anyio.to_thread.run_sync(engine.predict, data, name, task, symptoms, metadata, attribution,
                                              spectrogram)

    @app.post("/spectrogram", response_class=Response, responses={200: {"content": {"image/png": {}}}, **ERRORS},
              summary="PNG of the OPERA log-mel spectrogram the encoder sees")
    async def spectrogram(audio: Annotated[UploadFile, File(description="recording")]) -> Response:
        data, name = await _read_upload(audio, engine.limits)

        def render() -> bytes:
            return engine.spectrogram(engine.decode(data, name))

        return Response(await anyio.to_thread.run_sync(render), media_type="image/png")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR, follow_symlink=False), name="static")
    return app


@contextlib.contextmanager
def running_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", timeout: float = 60.0):
    """Run ``app`` under uvicorn in a background thread; yields the base URL, stops the server on exit."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off"))
    thread = threading.Thread(target=server.run, name="respiramfm-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by `respiramfm finetune`")
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoder-checkpoint", help="audio encoder checkpoint, if not where config.json says")
    parser.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                        help=f"largest accepted upload in MiB (default {DEFAULT_MAX_UPLOAD_MB:g})")
    parser.add_argument("--max-seconds", type=float, default=DEFAULT_MAX_SECONDS,
                        help=f"longest accepted recording in seconds (default {DEFAULT_MAX_SECONDS:g})")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from respiramfm.errors import ConfigError

    if args.max_upload_mb <= 0 or args.max_seconds <= 0:
        raise ConfigError("--max-upload-mb and --max-seconds must be positive")
    app = create_app(args.model, device=args.device, encoder_checkpoint=args.encoder_checkpoint,
                     max_upload_mb=args.max_upload_mb, max_seconds=args.max_seconds)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, lifespan="off")
    return 0


__all__ = ["STATIC_DIR", "add_arguments", "create_app", "run", "running_server"]
