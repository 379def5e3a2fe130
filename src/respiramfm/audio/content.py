"""Is there anything to hear?  The content check run before a recording is scored.

A file can decode perfectly and still carry no information: one sample, three
seconds of digital zeros, a click in silence.  The model would turn such input
into a probability as confident-looking as any other, so ``predict`` and the
server refuse it (:class:`~respiramfm.errors.AudioContentError`, HTTP 422)
instead of answering.  Two thresholds, both documented in docs/reliability.md:

* **Duration after trimming** at least :data:`MIN_SECONDS` (0.1 s).  The
  recording is trimmed exactly as the OPERA front end trims it (frames more than
  ``trim_top_db`` below the loudest frame are dropped from both ends), so what is
  measured is what the encoder would get before repeat-padding.  0.1 s is one
  trim frame at 16 kHz, shorter than any cough.
* **Not silent**: the peak of the DC-removed waveform must reach
  :data:`SILENCE_DBFS` (-60 dBFS, amplitude 0.001).  Digital silence, 16-bit
  dither (about -90 dBFS) and a constant offset all fall below it; the sampled
  ICBHI and KAUH test recordings peak between -18 and 0 dBFS.

Decoding (:mod:`respiramfm.audio.decode`) does not apply this check: a silent file
is valid audio, and embedding or training jobs keep it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from respiramfm.audio.frontend import FrontendConfig, trim_bounds
from respiramfm.errors import AudioContentError

#: Shortest recording, after OPERA's trimming, that is scored (seconds).
MIN_SECONDS = 0.1
#: Peak level (dB relative to full scale, DC removed) below which a recording counts as silent.
SILENCE_DBFS = -60.0


@dataclass(frozen=True)
class Content:
    """What the check measured: total and trimmed duration (s), peak level (dBFS, DC removed)."""

    seconds: float
    trimmed_seconds: float
    peak_dbfs: float

    def problems(self) -> list[str]:
        out = []
        if self.trimmed_seconds < MIN_SECONDS:
            out.append(f"too short to score: {self.trimmed_seconds:.3f} s of sound after trimming "
                       f"(minimum {MIN_SECONDS:g} s)")
        if self.peak_dbfs < SILENCE_DBFS:
            level = "no signal (all samples equal)" if self.peak_dbfs == -np.inf else f"peak {self.peak_dbfs:.1f} dBFS"
            out.append(f"silent: {level} (below {SILENCE_DBFS:g} dBFS)")
        return out


def measure(wave: np.ndarray, sr: int, cfg: FrontendConfig | None = None) -> Content:
    """Duration, duration after the front end's trimming, and DC-removed peak level of a mono waveform."""
    cfg = cfg or FrontendConfig()
    y = np.asarray(wave, dtype=np.float64).reshape(-1)
    if y.size == 0:
        return Content(0.0, 0.0, -np.inf)
    start, end = trim_bounds(y, cfg.trim_top_db, cfg.trim_frame, cfg.trim_hop) if cfg.trim else (0, y.size)
    peak = float(np.abs(y - y.mean()).max())
    return Content(y.size / sr, max(0, end - start) / sr, 20.0 * np.log10(peak) if peak > 0 else -np.inf)


def check_content(wave: np.ndarray, sr: int, name: str | None = None, cfg: FrontendConfig | None = None) -> Content:
    """Raise :class:`AudioContentError` (naming ``name``) when there is nothing to score; else the measurements."""
    content = measure(wave, sr, cfg)
    problems = content.problems()
    if problems:
        raise AudioContentError("; ".join(problems), path=name)
    return content


__all__ = ["MIN_SECONDS", "SILENCE_DBFS", "Content", "check_content", "measure"]
