"""Audio decoding and the exact OPERA-CT front end.

* :func:`load` / :func:`load_audio_bytes` / :func:`load_many`: any recording
  (wav, flac, ogg, mp3, webm/opus, ...) to a mono float32 waveform at 16 kHz,
  bit-identical to ``librosa.load`` where libsndfile reads the file; bad input
  raises :class:`~respiramfm.errors.AudioDecodeError`.
* :func:`opera_spectrogram_batch` (main path, torch, CPU/GPU) and
  :func:`opera_spectrogram` (one clip, numpy): OPERA's trimmed, repeat-padded,
  min-max normalised (T, 64) log-mel, parity-tested against the OPERA code.
"""

from respiramfm.audio.decode import (
    DEFAULT_MAX_SECONDS,
    decode_native,
    load,
    load_audio_bytes,
    load_many,
    resample,
    sniff_format,
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
    "CROPS",
    "DEFAULT_MAX_SECONDS",
    "FrontendConfig",
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
