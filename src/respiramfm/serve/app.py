"""``respiramfm serve``: an HTTP prediction API and a web page for one saved model.

The app is built by :func:`create_app` (a factory, so tests can build one per
session); the model is loaded once, when the app is created, and shared by all
requests (see :mod:`respiramfm.serve.engine` for why inference runs under a lock).

Endpoints: ``POST /predict`` (multipart: ``audio`` file, ``task``, ``symptoms`` or
``metadata``, optional ``attribution`` / ``spectrogram`` flags), ``POST
/spectrogram`` (PNG of the model's input), ``GET /tasks``, ``GET /health``, the
OpenAPI schema at ``/openapi.json``, and the page at ``/`` with its assets under
``/static/`` -- the only files the server ever reads from disk after start-up.

Every JSON answer carries ``"notice"``: the research-use notice. Every refused
request gets a 4xx JSON body ``{"error": code, "detail": text, "notice": ...}``.
Slow, oversized, idle and cross-site clients are handled in
:mod:`respiramfm.serve.guards`. The interactive ``/docs`` pages are switched off: they load scripts from a CDN,
and nothing this server sends may reach outside the machine. A strict
Content-Security-Policy makes browsers enforce that for the page too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Sequence

import anyio
import uvicorn
from fastapi import FastAPI, File, Form, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from respiramfm import __version__
from respiramfm.errors import ConfigError, RespiraMFMError
from respiramfm.fusion.predict import Predictor
from respiramfm.serve.engine import DEFAULT_MAX_SECONDS, DEFAULT_MAX_UPLOAD_MB, Engine, InputError, Limits
from respiramfm.serve.guards import (LOOPBACK_HOSTS, BodyLimit, OriginPolicy, SecurityHeaders, ServerLimits,
                                     server_config, with_notice)

STATIC_DIR = Path(__file__).resolve().parent / "static"
FORM_OVERHEAD = 256 * 1024  # room for the text fields and multipart framing next to the audio
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
    decision: int | None = None          # 1/0 at the task's validation threshold; null: none (see threshold_rule)
    threshold: float | None = None
    threshold_rule: str
    trained_on: dict[str, Any]           # datasets (real or simulated) and tasks the model trained on
    attention: Attention | None = None
    audio: AudioInfo | None = None
    spectrogram_png: str | None = None
    notice: str


class ErrorBody(BaseModel):
    error: str
    detail: Any
    notice: str


ERRORS = {400: {"model": ErrorBody}, 413: {"model": ErrorBody}, 422: {"model": ErrorBody}}


# ---------------------------------------------------------------------- app
def _slug(status: int) -> str:
    return {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(
        status, f"http_{status}")


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(InputError)
    async def _input(_req, exc: InputError):
        return JSONResponse(with_notice(exc.body()), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, exc: RequestValidationError):
        detail = [{"loc": [str(x) for x in e.get("loc", ())], "msg": str(e.get("msg", ""))} for e in exc.errors()]
        return JSONResponse(with_notice({"error": "invalid_request", "detail": detail}), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, exc: StarletteHTTPException):
        return JSONResponse(with_notice({"error": _slug(exc.status_code), "detail": str(exc.detail)}),
                            status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RespiraMFMError)
    async def _ours(_req, exc: RespiraMFMError):
        return JSONResponse(with_notice({"error": "bad_input", "detail": exc.cause}), status_code=400)

    @app.exception_handler(Exception)
    async def _bug(_req, exc: Exception):
        log.exception("unhandled error")
        return JSONResponse(with_notice({"error": "internal_error", "detail": type(exc).__name__}),
                            status_code=500)


async def _read_upload(audio: UploadFile | None, limits: Limits) -> tuple[bytes | None, str | None]:
    if audio is None:
        return None, None
    data = await audio.read(limits.max_upload_bytes + 1)
    return data, audio.filename


def create_app(model_dir: str | Path | None = None, *, predictor=None, device: str = "cpu",
               encoder_checkpoint: str | None = None, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
               max_seconds: float = DEFAULT_MAX_SECONDS, batch_window_ms: float = 0.0,
               allowed_hosts: Sequence[str] | None = None, allowed_origins: Sequence[str] = (),
               server_limits: ServerLimits | None = None) -> FastAPI:
    """The FastAPI app for one model (a saved directory, or an already loaded Predictor).

    ``allowed_hosts`` (``None``: any Host) and ``allowed_origins`` (besides the
    server's own) set the :class:`~respiramfm.serve.guards.OriginPolicy`;
    ``server_limits`` supplies the body timeouts.
    """
    if (model_dir is None) == (predictor is None):
        raise ValueError("give exactly one of model_dir and predictor")
    if predictor is None:
        predictor = Predictor.from_pretrained(model_dir, device=device, encoder_checkpoint=encoder_checkpoint)
    limits = Limits(max_upload_bytes=int(max_upload_mb * 1024 * 1024), max_seconds=float(max_seconds))
    engine = Engine(predictor, limits, batch_window_ms=batch_window_ms)

    app = FastAPI(title="RespiraMFM", version=__version__, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json",
                  description="Research prototype: probability of a respiratory condition from a recording and "
                              "symptom text. Not a medical device; not a diagnosis.")
    app.state.engine = engine
    task_names = [t["name"] for t in engine.tasks()]  # documented in the schema; checked by the engine
    timing = server_limits or ServerLimits()
    app.add_middleware(BodyLimit, max_bytes=limits.max_upload_bytes + FORM_OVERHEAD, timeout=timing.body_timeout,
                       idle_timeout=timing.body_idle_timeout)
    app.add_middleware(OriginPolicy, allowed_hosts=allowed_hosts, allowed_origins=allowed_origins)
    app.add_middleware(SecurityHeaders)
    _install_error_handlers(app)

    @app.get("/health", summary="model identity and limits")
    def health() -> dict:
        return with_notice(engine.info())

    @app.get("/tasks", summary="the tasks this model can score")
    def tasks() -> dict:
        return with_notice({"tasks": engine.tasks()})

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
        return with_notice(await anyio.to_thread.run_sync(engine.predict, data, name, task, symptoms, metadata,
                                                          attribution, spectrogram))

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
def running_server(app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning", timeout: float = 60.0,
                   limits: ServerLimits | None = None):
    """Run ``app`` under uvicorn in a background thread; yields the base URL, stops the server on exit.

    ``limits``: the connection-level :class:`ServerLimits` (header and keep-alive
    timeouts, connection cap); the body timeouts are the app's own.
    """
    server = uvicorn.Server(server_config(app, host, port, limits, log_level=log_level))
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
    parser.add_argument("--batch-window-ms", type=float, default=0.0,
                        help="micro-batching: requests arriving within this many ms share one forward pass "
                             "(0, the default: one request at a time, bit-identical to `respiramfm predict`)")
    parser.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                        help="a host name this server answers to (repeatable); on a loopback --host the default is "
                             f"{', '.join(LOOPBACK_HOSTS)}, elsewhere any Host unless this is given")
    parser.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                        help="an origin (scheme://host[:port]) besides the server's own that may POST (repeatable)")
    d = ServerLimits()
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                        help=f"open connections; more are closed on arrival (default {d.max_connections})")
    parser.add_argument("--header-timeout", type=float, default=d.header_timeout,
                        help=f"seconds for a request's headers to arrive (default {d.header_timeout:g})")
    parser.add_argument("--body-timeout", type=float, default=d.body_timeout,
                        help=f"seconds for a whole request body (default {d.body_timeout:g}; "
                             f"{d.body_idle_timeout:g} s at most between two chunks)")
    parser.add_argument("--keep-alive-timeout", type=float, default=d.keep_alive_timeout,
                        help=f"seconds an idle connection stays open (default {d.keep_alive_timeout:g})")
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    if args.max_upload_mb <= 0 or args.max_seconds <= 0:
        raise ConfigError("--max-upload-mb and --max-seconds must be positive")
    try:
        limits = ServerLimits(header_timeout=args.header_timeout, body_timeout=args.body_timeout,
                              body_idle_timeout=min(ServerLimits.body_idle_timeout, args.body_timeout),
                              keep_alive_timeout=args.keep_alive_timeout, max_connections=args.max_connections)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    hosts = list(args.allow_host)
    if args.host in ("127.0.0.1", "localhost", "::1"):
        hosts += LOOPBACK_HOSTS  # a loopback server answers to loopback names only: no DNS rebinding
    app = create_app(args.model, device=args.device, encoder_checkpoint=args.encoder_checkpoint,
                     max_upload_mb=args.max_upload_mb, max_seconds=args.max_seconds,
                     batch_window_ms=args.batch_window_ms, allowed_hosts=hosts or None,
                     allowed_origins=args.allow_origin, server_limits=limits)
    uvicorn.Server(server_config(app, args.host, args.port, limits, log_level=args.log_level)).run()
    return 0


__all__ = ["STATIC_DIR", "ServerLimits", "add_arguments", "create_app", "run", "running_server"]
