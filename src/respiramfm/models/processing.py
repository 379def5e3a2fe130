"""The one input processor: record | path | bytes | waveform (+ symptoms or metadata) -> model inputs.

Training, evaluation, ``respiramfm predict`` and the server all turn their inputs into a
:class:`~respiramfm.models.sequence.FusionItem` here, so every rule below exists once:

* **decoding** (:meth:`InputProcessor.waveform`): a path is read only if it is a regular file
  (a directory or FIFO is refused by name, never opened), bytes are decoded in memory with the
  format sniffed from the content (:func:`respiramfm.audio.load_audio_bytes`), a ready
  :class:`Waveform` is used as is; every clip passes the content check (nothing to hear is
  refused, never scored);
* **the front end**: OPERA's log-mel with the settings the model was trained with
  (:meth:`InputProcessor.spectrogram`, computed once per :class:`Waveform`);
* **the embedding-store lookup** (:meth:`InputProcessor.stored_audio`): the first store holding
  the record, finite vectors only, with the reason when there is none;
* **the record-context rule** (:func:`record_context`): a record's own context text when it has
  one, else the template wording of its metadata — the same text in training, evaluation and
  prediction.

The audio encoder is not part of the processor: it belongs to the model being served, so
callers hand an ``embed(spectrograms) -> embeddings`` function (``Predictor.embed_specs``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from respiramfm.audio import (DEFAULT_MAX_SECONDS, FrontendConfig, check_content, load, load_audio_bytes,
                              opera_spectrogram_batch, opera_spectrogram_files, sniff_format)
from respiramfm.cache.view import EmbeddingStore
from respiramfm.data.records import Record
from respiramfm.data.templates import render_context, value_text
from respiramfm.errors import AudioDecodeError, ConfigError, DataError
from respiramfm.models.files import check_regular_file, read_bytes
from respiramfm.models.sequence import FusionItem
from respiramfm.utils.io import loads_json_bounded

MAX_AUDIO_FILE_BYTES = 1024 ** 3  # a file path given to predict; uploads have the server's own limit

AudioInput = Any  # str | os.PathLike | bytes | Waveform | np.ndarray (mono, at the front end's rate)


def record_context(rec: Record) -> str:
    """THE context rule: the record's own context text if it has any, else the template wording of its metadata."""
    text = rec.context.strip() if rec.context else ""
    return text or render_context(rec)


@dataclass
class Waveform:
    """A decoded recording (mono float32 at ``sr``), e.g. an upload decoded from bytes."""

    name: str
    wave: np.ndarray
    sr: int
    format: str = ""
    _spec: np.ndarray | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.name

    @property
    def seconds(self) -> float:
        return len(self.wave) / self.sr if self.sr else 0.0


class InputProcessor:
    """Turns raw inputs into :class:`FusionItem` objects for one model's front end and stores."""

    def __init__(self, frontend: FrontendConfig | None = None,
                 stores: Sequence[str | os.PathLike | EmbeddingStore] = (),
                 embed: Callable[[list[np.ndarray]], np.ndarray] | None = None,
                 max_seconds: float | None = DEFAULT_MAX_SECONDS, device: str = "cpu"):
        self.frontend = frontend or FrontendConfig()
        self.stores = [s if isinstance(s, EmbeddingStore) else EmbeddingStore(s) for s in stores]
        self.embed = embed
        self.max_seconds = max_seconds
        self.device = device

    # ------------------------------------------------------------------ store lookup
    def stored_audio(self, record_id: str) -> tuple[np.ndarray | None, str]:
        """(embedding, "") from the first store holding ``record_id``, else (None, why there is none)."""
        store = next((s for s in self.stores if record_id in s), None)
        if store is None:
            return None, "no audio embedding in store"
        vec = np.asarray(store.get(record_id), dtype=np.float32)
        if not np.isfinite(vec).all():
            return None, "non-finite audio embedding"
        return vec, ""

    # ------------------------------------------------------------------ decoding and front end
    def waveform(self, audio: AudioInput, name: str | None = None, max_seconds: float | None = None) -> Waveform:
        """Decode ``audio`` (path, bytes, Waveform or waveform array) at the front end's rate, content-checked."""
        sr = self.frontend.sr
        limit = self.max_seconds if max_seconds is None else max_seconds
        if isinstance(audio, Waveform):
            wave = audio
        elif isinstance(audio, (bytes, bytearray, memoryview)):
            label = Path(name or "").name[:120] or "upload"
            data = bytes(audio)
            wave = Waveform(label, load_audio_bytes(data, label, sr=sr, max_seconds=limit), sr,
                            sniff_format(data[:64]) or "unknown")
        elif isinstance(audio, (str, os.PathLike)):
            p = check_regular_file(audio, "audio file", MAX_AUDIO_FILE_BYTES, error=AudioDecodeError)
            wave = Waveform(name or str(p), load(p, sr=sr, max_seconds=limit), sr, p.suffix.lstrip(".").lower())
        elif isinstance(audio, np.ndarray):
            if audio.ndim != 1 or not np.issubdtype(audio.dtype, np.floating):
                raise AudioDecodeError(f"a waveform must be a 1-D float array at {sr} Hz, got {audio.dtype} "
                                       f"{audio.shape}", path=name)
            wave = Waveform(name or "waveform", np.ascontiguousarray(audio, dtype=np.float32), sr, "array")
        else:
            raise ConfigError(f"audio must be a path, bytes or a waveform, not {type(audio).__name__}")
        if wave.sr != sr:
            raise AudioDecodeError(f"waveform is at {wave.sr} Hz, the front end needs {sr} Hz", path=wave.name)
        check_content(wave.wave, sr, name=wave.name, cfg=self.frontend)  # nothing to hear: refused, never scored
        return wave

    def spectrogram(self, audio: AudioInput, name: str | None = None) -> np.ndarray:
        """The OPERA log-mel (T, n_mels) the encoder sees (computed once per :class:`Waveform`)."""
        wave = audio if isinstance(audio, Waveform) else self.waveform(audio, name)
        if wave._spec is None:
            try:
                wave._spec = opera_spectrogram_batch([wave.wave], self.frontend, device=self.device)[0]
            except AudioDecodeError as exc:
                raise AudioDecodeError(exc.cause, path=wave.name) from exc
        return wave._spec

    def spectrograms(self, paths: Sequence[str | os.PathLike]) -> list[np.ndarray | AudioDecodeError]:
        """Many files at once (thread-pool decoding); a bad file yields its error in place."""
        def content(wave: np.ndarray) -> None:
            check_content(wave, self.frontend.sr, cfg=self.frontend)

        out: list[Any] = [None] * len(paths)
        readable: list[int] = []
        for i, p in enumerate(paths):
            try:
                check_regular_file(p, "audio file", MAX_AUDIO_FILE_BYTES, error=AudioDecodeError)
                readable.append(i)
            except AudioDecodeError as exc:
                out[i] = exc
        specs = opera_spectrogram_files([paths[i] for i in readable], self.frontend, device=self.device,
                                        max_seconds=self.max_seconds, content_check=content) if readable else []
        for i, s in zip(readable, specs):
            out[i] = s
        return out

    def embed_audio(self, audio: AudioInput, name: str | None = None) -> np.ndarray:
        """Decode, front end and encoder: the embedding the model expects for one recording."""
        if self.embed is None:
            raise ConfigError("this processor has no audio encoder; give it embed=...")
        return self.embed([self.spectrogram(audio, name)])[0]

    # ------------------------------------------------------------------ model inputs
    def record_item(self, task, rec: Record, use_audio: bool = True) -> tuple[FusionItem | None, str]:
        """(item, "") for a manifest record with its stored embedding, or (None, why it cannot be scored)."""
        audio = None
        if use_audio:
            if not rec.has_audio:
                return None, "record has no audio"
            audio, reason = self.stored_audio(rec.record_id)
            if audio is None:
                return None, reason
        return FusionItem(task=task, audio=audio, context=record_context(rec), audio_type=rec.audio_type,
                          key=rec.record_id), ""

    def request_item(self, task, audio: AudioInput | None = None, symptoms: str | None = None,
                     metadata: dict | None = None, embed: bool = True, use_audio: bool = True) -> FusionItem:
        """The model input of one request: free-text symptoms (as written) or metadata (template), audio embedded.

        With ``embed=False`` the audio is left for the caller (the server's batcher runs the
        encoder for many requests at once; it reads the spectrogram from :meth:`spectrogram`).
        """
        if symptoms is not None and metadata is not None:
            raise ConfigError("give either free-text symptoms or metadata, not both")
        audio_type, context = "", None
        if metadata is not None:
            record = metadata_to_record(metadata)
            audio_type = record.audio_type
            context = record_context(record) if metadata else None
        elif symptoms is not None:
            context = str(symptoms).strip() or None
        if audio is None and context is None:
            raise DataError("nothing to predict from: give an audio file and/or symptoms or metadata")
        vec = self.embed_audio(audio) if embed and audio is not None and use_audio else None
        return FusionItem(task=task, audio=vec, context=context, audio_type=audio_type, key=_key(audio))


def _key(audio: AudioInput | None) -> str:
    """How an item names its recording in error messages (never the content itself)."""
    if audio is None:
        return "input"
    if isinstance(audio, (str, os.PathLike, Waveform)):
        return str(audio)
    return "upload" if isinstance(audio, (bytes, bytearray, memoryview)) else "waveform"


# ---------------------------------------------------------------------- metadata
METADATA_KEYS = ("age", "sex", "gender", "symptoms", "medical_history", "smoker", "location", "audio_type",
                 "device", "gender_text", "age_text", "smoking_text", "symptoms_text")
MAX_METADATA_BYTES = 16384  # a patient record is a few hundred characters
_SEX = {"m": "male", "male": "male", "man": "male", "f": "female", "female": "female", "woman": "female"}
_YES = {"yes", "y", "true", "1", "smoker", "current smoker"}
_NO = {"no", "n", "false", "0", "non-smoker", "nonsmoker", "never"}


def parse_metadata_text(text: str, source: str = "metadata") -> dict:
    """Metadata given as JSON text (never a path): a bounded parse that must give an object."""
    if len(text) > MAX_METADATA_BYTES:
        raise DataError(f"{source} is longer than {MAX_METADATA_BYTES} characters")
    value = loads_json_bounded(text, source)  # depth-checked; huge integers read as floats
    if not isinstance(value, dict):
        raise DataError(f"{source} must be a JSON object, got {type(value).__name__}")
    return value


def parse_metadata(text: str) -> dict:
    """``--metadata``: a JSON object given inline, or the path of a file holding one (a regular file only)."""
    looks_inline = text.lstrip().startswith("{")
    if not looks_inline and (Path(text).suffix.lower() == ".json" or os.path.lexists(text)):
        try:
            raw = read_bytes(text, "metadata file", MAX_METADATA_BYTES, error=DataError)
        except DataError as exc:
            raise DataError(f"cannot read metadata file: {exc.cause}", path=text) from None
        try:
            return parse_metadata_text(raw.decode("utf-8"), text)
        except UnicodeDecodeError:
            raise DataError("metadata file is not UTF-8 text", path=text) from None
    return parse_metadata_text(text, "--metadata")


def metadata_to_record(meta: dict) -> Record:
    """A Record from user metadata; unknown keys and malformed values are DataErrors."""
    unknown = sorted(set(meta) - set(METADATA_KEYS))
    if unknown:
        raise DataError(f"unknown metadata field(s) {unknown}; allowed: {list(METADATA_KEYS)}")
    extra: dict = {}
    age = meta.get("age")
    if age is not None and age != "":
        try:
            age = float(age)
        except (TypeError, ValueError, OverflowError):
            extra["age_text"] = value_text(age, "age")  # an age band such as "45-54"
            age = None
        else:
            if isinstance(meta.get("age"), bool) or not math.isfinite(age) or age < 0:
                raise DataError(f"metadata field 'age' must be a non-negative number, got {meta.get('age')!r}")
    else:
        age = None
    sex_raw = value_text(meta.get("sex", meta.get("gender")), "sex")
    sex = _SEX.get(sex_raw.lower(), "")
    if sex_raw and not sex:
        extra["gender_text"] = sex_raw
    smoker_raw = meta.get("smoker")
    if isinstance(smoker_raw, bool):
        smoker = "yes" if smoker_raw else "no"
    else:
        s = value_text(smoker_raw, "smoker").lower()
        smoker = "yes" if s in _YES else "no" if s in _NO else ""
        if s and not smoker:
            extra["smoking_text"] = s
    for key in ("gender_text", "age_text", "smoking_text", "symptoms_text"):
        if meta.get(key):
            extra[key] = value_text(meta[key], key)
    text = {k: value_text(meta.get(k), k) for k in ("audio_type", "symptoms", "medical_history", "location", "device")}
    return Record(record_id="input", patient_id="input", dataset="input", age=age, sex=sex, smoker=smoker,
                  extra=extra, **text)


__all__ = ["METADATA_KEYS", "InputProcessor", "Waveform", "metadata_to_record", "parse_metadata", "parse_metadata_text",
           "record_context"]
