"""The serving side of a saved model: checked inputs in, the same answer as ``respiramfm predict`` out.

Why a separate engine instead of calling :class:`~respiramfm.fusion.predict.Predictor`
from the route handlers directly:

* **Uploads never touch the file system.** ``Predictor.predict`` reads audio from a
  path. Here the upload is decoded from bytes (:func:`respiramfm.audio.load_audio_bytes`,
  format sniffed from the content, never from the file name or content type) and
  handed to ``Predictor.predict`` as an :class:`Upload` object;
  :class:`ServePredictor` only overrides the one step that reads the file, so
  every other rule of ``predict`` (prompt, context template, missing-modality
  handling, warnings) is the fusion code itself and the probabilities are
  identical to ``respiramfm predict`` on the same recording.
* **One model, many threads.** The model and its encoder are shared torch
  modules, and attention attribution switches the attention implementation of
  the shared model for the duration of a call, so inference runs under one lock.
  Decoding, which is the other expensive step, runs outside it.
* **Bad input is the client's problem, not a crash.** Every rejected input
  becomes an :class:`InputError` with an HTTP status, a stable error code and a
  human-readable detail.
"""

from __future__ import annotations

import base64
import io
import json
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from respiramfm.audio import load_audio_bytes, opera_spectrogram_batch, sniff_format
from respiramfm.errors import AudioDecodeError, ConfigError, DataError
from respiramfm.fusion.predict import Predictor
from respiramfm.fusion.predict_io import metadata_to_record

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_SECONDS = 120.0  # the supported datasets' recordings last 1-90 s
MAX_METADATA_CHARS = 16384  # a patient record is a few hundred characters


class InputError(Exception):
    """A request the server refuses: HTTP ``status``, machine-readable ``error``, human ``detail``."""

    def __init__(self, status: int, error: str, detail: str):
        super().__init__(detail)
        self.status, self.error, self.detail = status, error, detail

    def body(self) -> dict:
        return {"error": self.error, "detail": self.detail}


@dataclass(frozen=True)
class Limits:
    """What one request may contain."""

    max_upload_bytes: int = int(DEFAULT_MAX_UPLOAD_MB * 1024 * 1024)
    max_seconds: float = DEFAULT_MAX_SECONDS

    def as_dict(self) -> dict:
        return {"max_upload_bytes": self.max_upload_bytes, "max_seconds": self.max_seconds}


@dataclass
class Upload:
    """A decoded upload, passed to ``Predictor.predict`` in place of a path."""

    name: str
    wave: np.ndarray
    sr: int
    format: str
    _spec: np.ndarray | None = field(default=None, repr=False)

    def __str__(self) -> str:  # Predictor uses str(audio_path) as the item key
        return self.name

    @property
    def seconds(self) -> float:
        return len(self.wave) / self.sr

    def spectrogram(self, frontend) -> np.ndarray:
        """The OPERA log-mel (T, n_mels) the encoder sees, computed once per upload."""
        if self._spec is None:
            try:
                self._spec = opera_spectrogram_batch([self.wave], frontend)[0]
            except AudioDecodeError as exc:
                raise AudioDecodeError(exc.cause, path=self.name) from exc
        return self._spec


class ServePredictor(Predictor):
    """A Predictor that also accepts an in-memory :class:`Upload` wherever it expects an audio path."""

    def embed_file(self, path):
        if isinstance(path, Upload):
            # Same steps as Predictor.embed_file after decoding: front end, then the recorded encoder.
            return self.embed_specs([path.spectrogram(self.frontend)])[0]
        return super().embed_file(path)

    @classmethod
    def wrap(cls, predictor: Predictor) -> "ServePredictor":
        if isinstance(predictor, cls):
            return predictor
        return cls(predictor.model, predictor.model_dir, predictor.device, predictor.encoder_checkpoint,
                   predictor._encoder)


def group_words(tokens: list[str], weights: list[float]) -> list[dict]:
    """Merge sub-word tokens into words (a word starts at a token that begins with whitespace).

    The page highlights words, not BPE pieces; a word's weight is the attention
    mass of its pieces, so the word weights still sum to ``context_mass``.
    """
    words: list[dict] = []
    for tok, w in zip(tokens, weights):
        if words and not tok[:1].isspace():
            words[-1]["text"] += tok
            words[-1]["weight"] += float(w)
        else:
            words.append({"text": tok, "weight": float(w)})
    return words


def spectrogram_png(spec: np.ndarray, frontend) -> bytes:
    """A PNG of the model's input spectrogram (after OPERA's trimming and repeat-padding)."""
    from matplotlib.figure import Figure  # no pyplot: no global state shared between threads

    fig = Figure(figsize=(7.0, 2.6), dpi=100)
    ax = fig.add_subplot()
    seconds = spec.shape[0] * frontend.hop / frontend.sr
    ax.imshow(spec.T, origin="lower", aspect="auto", cmap="magma", vmin=0.0, vmax=1.0,
              extent=(0.0, seconds, 0, spec.shape[1]), interpolation="nearest")
    ax.set_xlabel("time (s) - trimmed and repeat-padded as the encoder sees it")
    ax.set_ylabel("mel band")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


class Engine:
    """A loaded model behind a lock, with the request checks of the HTTP API."""

    def __init__(self, predictor: Predictor, limits: Limits | None = None):
        self.predictor = ServePredictor.wrap(predictor)
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._plot_lock = threading.Lock()
        if self.model.cfg.mode != "text_only":
            self.predictor.encoder()  # build (and hash-check) the audio encoder now, not on the first request

    @property
    def model(self):
        return self.predictor.model

    # ------------------------------------------------------------------ descriptions
    def tasks(self) -> list[dict]:
        out = []
        for name, t in sorted(self.model.tasks.items(), key=lambda kv: _task_order(kv[0])):
            out.append({"name": name, "disease": t.disease, "role": t.role, "description": t.description,
                        "dataset": t.dataset, "audio_type": t.audio_type, "unseen_disease": bool(t.unseen_disease),
                        "simulated": bool(t.simulated)})
        return out

    def info(self) -> dict:
        cfg = self.model.cfg
        return {"status": "ok", "model": self.predictor.model_id, "backbone": cfg.backbone, "mode": cfg.mode,
                "encoder": cfg.encoder.name, "device": str(self.predictor.device), "limits": self.limits.as_dict()}

    # ------------------------------------------------------------------ checks
    def check_task(self, name: str | None):
        if not name or not str(name).strip():
            raise InputError(400, "missing_task", "the form field 'task' is required (see GET /tasks)")
        try:
            return self.model.get_task(str(name).strip())
        except ConfigError as exc:
            raise InputError(400, "unknown_task", exc.cause) from None

    @staticmethod
    def parse_context(symptoms: str | None, metadata: str | None) -> tuple[str | None, dict | None]:
        symptoms = symptoms.strip() if symptoms and symptoms.strip() else None
        meta = None
        if metadata is not None and metadata.strip():
            if len(metadata) > MAX_METADATA_CHARS:
                raise InputError(400, "bad_metadata", f"metadata is longer than {MAX_METADATA_CHARS} characters")
            try:
                meta = json.loads(metadata)  # never a path: parse_metadata would read files named *.json
            except json.JSONDecodeError as exc:
                raise InputError(400, "bad_metadata", f"metadata is not valid JSON: {exc.msg} "
                                                      f"(line {exc.lineno}, column {exc.colno})") from None
            except RecursionError:
                raise InputError(400, "bad_metadata", "metadata JSON is nested too deeply") from None
            if not isinstance(meta, dict):
                raise InputError(400, "bad_metadata", f"metadata must be a JSON object, got {type(meta).__name__}")
            try:
                metadata_to_record(meta)
            except DataError as exc:
                raise InputError(400, "bad_metadata", exc.cause) from None
        if symptoms is not None and meta is not None:
            raise InputError(400, "conflicting_input",
                             "give either 'symptoms' (free text) or 'metadata' (JSON), not both")
        return symptoms, meta

    def decode(self, data: bytes, filename: str | None) -> Upload:
        """Bytes -> waveform at the front end's rate, with the size and duration limits applied."""
        name = Path(filename or "").name[:120] or "upload"
        if not data:
            raise InputError(400, "empty_audio", f"{name}: the uploaded audio is empty (0 bytes)")
        if len(data) > self.limits.max_upload_bytes:
            raise InputError(413, "audio_too_large", f"{name}: upload exceeds {self.limits.max_upload_bytes} bytes")
        sr = self.predictor.frontend.sr
        try:
            wave = load_audio_bytes(data, name, sr=sr, max_seconds=self.limits.max_seconds)
        except AudioDecodeError as exc:
            if "longer than max_seconds" in exc.cause:
                raise InputError(413, "audio_too_long", f"{name}: recording is longer than the server's limit of "
                                                        f"{self.limits.max_seconds:g} s") from None
            raise InputError(400, "undecodable_audio", f"{name}: {exc.cause}") from None
        return Upload(name=name, wave=wave, sr=sr, format=sniff_format(data[:64]) or "unknown")

    # ------------------------------------------------------------------ requests
    def predict(self, audio: bytes | None, filename: str | None, task: str | None, symptoms: str | None = None,
                metadata: str | None = None, attribution: bool = False, spectrogram: bool = False) -> dict:
        """One request -> the Predictor's result, plus the decoded-audio summary and optional extras."""
        task_obj = self.check_task(task)
        symptoms, meta = self.parse_context(symptoms, metadata)
        upload = self.decode(audio, filename) if audio is not None else None
        if upload is None and symptoms is None and not meta:
            raise InputError(400, "no_input", "nothing to predict from: upload 'audio' and/or give 'symptoms' or "
                                              "'metadata'")
        try:
            with self._lock:
                result = self.predictor.predict(audio_path=upload, symptoms=symptoms, metadata=meta,
                                                task=task_obj.name, attribution=attribution)
        except AudioDecodeError as exc:
            raise InputError(400, "undecodable_audio", str(exc)) from None
        except (DataError, ConfigError) as exc:
            raise InputError(400, "bad_input", exc.cause) from None
        if attribution:
            att = result["attention"]
            att["words"] = group_words(att["tokens"], att["weights"])
        if upload is not None:
            result["audio"] = {"name": upload.name, "format": upload.format, "seconds": round(upload.seconds, 3)}
            if spectrogram:
                result["spectrogram_png"] = base64.b64encode(self.spectrogram(upload)).decode("ascii")
        return result

    def spectrogram(self, upload: Upload) -> bytes:
        try:
            spec = upload.spectrogram(self.predictor.frontend)
        except AudioDecodeError as exc:
            raise InputError(400, "undecodable_audio", str(exc)) from None
        with self._plot_lock:
            return spectrogram_png(spec, self.predictor.frontend)


def _task_order(name: str) -> tuple:
    """T1 < T2 < ... < T10, then other names alphabetically."""
    digits = name[1:]
    return (0, int(digits), name) if name[:1] == "T" and digits.isdigit() else (1, 0, name)


__all__ = ["DEFAULT_MAX_SECONDS", "DEFAULT_MAX_UPLOAD_MB", "Engine", "InputError", "Limits", "ServePredictor",
           "Upload", "group_words", "spectrogram_png"]
