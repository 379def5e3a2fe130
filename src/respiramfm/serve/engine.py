"""The serving side of a saved model: checked inputs in, the same answer as ``respiramfm predict`` out.

Why a separate engine instead of calling :class:`~respiramfm.fusion.predict.Predictor`
from the route handlers directly:

* **Uploads never touch the file system.** The uploaded bytes go to the model's input
  processor (:mod:`respiramfm.models.processing`) as bytes: it decodes them in memory
  (format sniffed from the content, never from the file name or content type) into a
  :class:`~respiramfm.models.processing.Waveform`, which ``Predictor.predict`` takes as
  its ``audio``. Every other rule of ``predict`` (front end, prompt, context rule,
  missing-modality handling, warnings) is the same code, so the probabilities are
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
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from respiramfm.errors import AudioContentError, AudioDecodeError, ConfigError, DataError
from respiramfm.fusion import model_facts
from respiramfm.fusion.predict import Predictor
from respiramfm.models.processing import Waveform, metadata_to_record, parse_metadata_text
from respiramfm.serve.batcher import DEFAULT_MAX_BATCH, BatchedModel, Job, MicroBatcher

DEFAULT_MAX_UPLOAD_MB = 20.0
DEFAULT_MAX_SECONDS = 120.0  # the supported datasets' recordings last 1-90 s


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

    def __init__(self, predictor: Predictor, limits: Limits | None = None, batch_window_ms: float = 0.0,
                 max_batch: int = DEFAULT_MAX_BATCH):
        self.predictor = predictor
        self.limits = limits or Limits()
        self._lock = threading.Lock()
        self._plot_lock = threading.Lock()
        # batch_window_ms > 0: concurrent requests share forward passes (serve/batcher.py); 0: one at a time
        self._batched = BatchedModel(self.predictor) if batch_window_ms > 0 else None
        self.batcher = MicroBatcher(self._run_batch, batch_window_ms, max_batch) if batch_window_ms > 0 else None
        if self.model.cfg.mode != "text_only":
            self.predictor.encoder()  # build (and hash-check) the audio encoder now, not on the first request

    @property
    def model(self):
        return self.predictor.model

    # ------------------------------------------------------------------ descriptions
    def tasks(self) -> list[dict]:
        """Every task the model can score. With a training record, ``role`` is what the model did with the task
        ("supervised": trained in stage 2; "zero-shot": not trained), ``trained`` / ``dataset_seen`` say so, and a
        task whose dataset the model never saw says that first in its description."""
        out = []
        for name, t in sorted(self.model.tasks.items(), key=lambda kv: _task_order(kv[0])):
            status = model_facts.task_status(self.model, t)
            role, description = t.role, t.description
            if status["trained"] is not None:
                role = "supervised" if status["trained"] else "zero-shot"
            if status["dataset_seen"] is False:
                description = (f"Never seen in training: this model was not trained on any {t.dataset} "
                               f"recording. {description}").strip()
            out.append({"name": name, "disease": t.disease, "role": role, "description": description,
                        "dataset": t.dataset, "audio_type": t.audio_type, "unseen_disease": bool(t.unseen_disease),
                        "simulated": bool(t.simulated), **status,
                        "has_threshold": name in (self.model.thresholds or {})})
        return out

    def info(self) -> dict:
        cfg = self.model.cfg
        return {"status": "ok", "model": self.predictor.model_id, "backbone": cfg.backbone, "mode": cfg.mode,
                "encoder": cfg.encoder.name, "device": str(self.predictor.device), "limits": self.limits.as_dict(),
                "trained_on": model_facts.trained_on(self.model)}

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
            try:  # never a path: only the CLI's parse_metadata reads files named *.json
                meta = parse_metadata_text(metadata, "metadata")  # depth-checked; huge integers read as floats
                metadata_to_record(meta)
            except DataError as exc:
                raise InputError(400, "bad_metadata", exc.cause) from None
        if symptoms is not None and meta is not None:
            raise InputError(400, "conflicting_input",
                             "give either 'symptoms' (free text) or 'metadata' (JSON), not both")
        return symptoms, meta

    def decode(self, data: bytes, filename: str | None) -> Waveform:
        """Bytes -> waveform at the front end's rate (the input processor), with the size and duration limits."""
        name = Path(filename or "").name[:120] or "upload"
        if not data:
            raise InputError(400, "empty_audio", f"{name}: the uploaded audio is empty (0 bytes)")
        if len(data) > self.limits.max_upload_bytes:
            raise InputError(413, "audio_too_large", f"{name}: upload exceeds {self.limits.max_upload_bytes} bytes")
        try:
            return self.predictor.processor.waveform(data, name, max_seconds=self.limits.max_seconds)
        except AudioContentError as exc:
            raise InputError(422, "no_audio_content", f"{name}: {exc.cause}") from None
        except AudioDecodeError as exc:
            if "longer than max_seconds" in exc.cause:
                raise InputError(413, "audio_too_long", f"{name}: recording is longer than the server's limit of "
                                                        f"{self.limits.max_seconds:g} s") from None
            raise InputError(400, "undecodable_audio", f"{name}: {exc.cause}") from None

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
            if self.batcher is not None and not attribution:  # attribution switches the attention kernel
                result = self.batcher.submit(self._job(upload, symptoms, meta, task_obj.name))
            else:
                with self._lock:
                    result = self.predictor.predict(audio=upload, symptoms=symptoms, metadata=meta,
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

    def _job(self, upload: Waveform | None, symptoms: str | None, meta: dict | None, task: str) -> Job:
        """Checks, context and front end in the request's own thread; the model runs in the batch."""
        item = self.predictor.request_item(upload, symptoms, meta, task, embed=False)
        spec = self.predictor.processor.spectrogram(upload) if upload is not None and \
            self.model.cfg.mode != "text_only" else None
        return Job(item=item, spec=spec, audio_given=upload is not None, context_given=item.context is not None)

    def _run_batch(self, jobs: list[Job]) -> list[dict]:
        with self._lock:
            return self._batched(jobs)

    def spectrogram(self, upload: Waveform) -> bytes:
        try:
            spec = self.predictor.processor.spectrogram(upload)
        except AudioDecodeError as exc:
            raise InputError(400, "undecodable_audio", str(exc)) from None
        with self._plot_lock:
            return spectrogram_png(spec, self.predictor.frontend)


def _task_order(name: str) -> tuple:
    """T1 < T2 < ... < T10, then other names alphabetically."""
    digits = name[1:]
    return (0, int(digits), name) if name[:1] == "T" and digits.isdigit() else (1, 0, name)


__all__ = ["DEFAULT_MAX_SECONDS", "DEFAULT_MAX_UPLOAD_MB", "Engine", "InputError", "Limits", "group_words",
           "spectrogram_png"]
