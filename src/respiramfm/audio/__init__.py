"""Audio decoding and the exact OPERA-CT front end.

* :func:`load` / :func:`load_audio_bytes` / :func:`load_many`: any recording
  (wav, flac, ogg, mp3, webm/opus, ...) to a mono float32 waveform at 16 kHz,
  bit-identical to ``librosa.load`` where libsndfile reads the file; bad input
  raises :class:`~respiramfm.errors.AudioDecodeError`; decoding is bounded by a
  native-rate cap and a decoded-samples budget (decode bombs stop early).
* :func:`check_content`: refuse recordings with nothing to hear (too short
  after trimming, or silent) before they are scored.
* :func:`opera_spectrogram_batch` (main path, torch, CPU/GPU) and
  :func:`opera_spectrogram` (one clip, numpy): OPERA's trimmed, repeat-padded,
  min-max normalised (T, 64) log-mel, parity-tested against the OPERA code.
"""

from respiramfm.audio.containers import sniff_format
from respiramfm.audio.content import MIN_SECONDS, SILENCE_DBFS, check_content
from respiramfm.audio.decode import (
    BUDGET_SAMPLES_PER_SECOND,
    DEFAULT_MAX_SECONDS,
    MAX_NATIVE_RATE,
    decode_native,
    load,
    load_audio_bytes,
    load_many,
    resample,
)
from respiramfm.audio.frontend import (
    CROPS,
    FrontendConfig,
    opera_spectrogram,
    opera_spectrogram_batch,
    opera_spectrogram_files,
    peak_window,
    preprocess_wave,
    repeat_pad,
    trim_bounds,
)

__all__ = [
    "BUDGET_SAMPLES_PER_SECOND",
    "CROPS",
    "DEFAULT_MAX_SECONDS",
    "MAX_NATIVE_RATE",
    "MIN_SECONDS",
    "SILENCE_DBFS",
    "FrontendConfig",
    "check_content",
    "decode_native",
    "load",
    "load_audio_bytes",
    "load_many",
    "opera_spectrogram",
    "opera_spectrogram_batch",
    "opera_spectrogram_files",
    "peak_window",
    "preprocess_wave",
    "repeat_pad",
    "resample",
    "sniff_format",
    "trim_bounds",
]
