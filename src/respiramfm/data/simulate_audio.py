"""Acoustic biomarkers for the SIMULATED cohort, synthesised with numpy/scipy.

Nothing here models a real patient. The point is a population whose recordings
carry the *kinds* of cue the real datasets carry, so that the whole pipeline
can be exercised offline and comparisons between modalities are meaningful:

* coughs: an explosive broadband onset, a noisy intermediate phase shaped by
  vocal-tract resonances and a decaying voiced phase. A "dry" cue (COVID-like)
  weakens voicing and adds turbulent high-frequency noise and hoarseness; a
  "wet" cue (TB-like) lengthens the cough, lowers its resonances and adds a
  mucus rattle of short transients after it.
* lung sounds: filtered-noise breathing with a given rate and
  inspiration/expiration ratio, heart sounds, crackles (short damped
  transients; fine = high and brief, coarse = low and longer) and wheezes
  (sustained tonal components at 400-1000 Hz with harmonics, mostly
  expiratory).
* the channel: device colouration (filters, EQ), noise floors of several
  colours, mains hum, babble, clipping and gain.

Every function draws from the ``numpy.random.Generator`` it is given, so a
recording is a pure function of its seed. Frequencies are in Hz and rendering
happens directly at the output sample rate (content above 0.45·sr is dropped).
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import numpy as np
from scipy import fft as sp_fft
from scipy import signal

from respiramfm.errors import DataError


@dataclass(frozen=True)
class Voice:
    """Speaker traits of a patient (kept across that patient's coughs)."""

    f0: float = 150.0                 # Hz, fundamental of the voiced phase
    formants: tuple[float, float, float] = (650.0, 1400.0, 2600.0)


@dataclass(frozen=True)
class CoughCues:
    """Disease cue strengths in [0, 1] for a cough recording (0 = absent)."""

    dry: float = 0.0                  # COVID-like: breathy, hoarse, little voicing
    wet: float = 0.0                  # TB-like: long, low, rattling
    n_coughs: tuple[int, int] = (2, 4)


@dataclass(frozen=True)
class LungCues:
    """Disease cues for a lung-sound recording."""

    rate_bpm: float = 15.0            # breaths per minute
    ie_ratio: float = 1.8             # expiration / inspiration duration
    wheeze_prob: float = 0.0          # chance that a breath phase carries a wheeze
    wheeze_band: tuple[float, float] = (400.0, 800.0)
    wheeze_level: float = 1.0         # amplitude relative to breath-noise RMS
    polyphonic: float = 0.0           # chance of a second simultaneous wheeze
    fine_crackles: float = 0.0        # mean crackles per inspiration (late inspiratory)
    coarse_crackles: float = 0.0      # mean crackles per cycle (early insp. + expiration)
    bronchial: float = 0.0            # share of harsher high-frequency breath noise


@dataclass(frozen=True)
class Channel:
    """Recording device and environment (a stethoscope is a channel with a low lowpass)."""

    highpass: tuple[float, float] = (80.0, 250.0)
    lowpass: tuple[float, float] = (6000.0, 12000.0)
    eq_bands: int = 2                 # random peaking filters (device colouration)
    snr_db: tuple[float, float] = (15.0, 40.0)
    noise_colour: tuple[float, float] = (0.5, 1.5)   # 1/f^c exponent range
    hum_prob: float = 0.0
    babble_prob: float = 0.0
    clip_prob: float = 0.0
    artifact_rate: float = 0.0        # stethoscope friction clicks per second
    heart_level: tuple[float, float] = (0.2, 0.8)  # heart sounds relative to breath (lung recordings)


# --------------------------------------------------------------------------- primitives


def _sos(kind: str, freq, sr: int, order: int = 2) -> np.ndarray:
    """Butterworth sections; cut-offs are snapped to a 10 Hz grid so designs can be cached."""
    nyq = 0.5 * sr
    if isinstance(freq, (tuple, list)):
        lo, hi = max(freq[0], 1.0), min(freq[1], 0.9 * nyq)
        return _design("bandpass", (_snap(lo), _snap(max(hi, lo * 1.05))), sr, order).copy()
    return _design(kind, _snap(min(freq, 0.9 * nyq)), sr, order).copy()


def _snap(f: float) -> float:
    return float(max(round(f / 10.0) * 10.0, 5.0))


@functools.lru_cache(maxsize=4096)
def _design(kind: str, freq, sr: int, order: int) -> np.ndarray:
    return signal.butter(order, freq, btype=kind, fs=sr, output="sos")


def _peaking(f0: float, gain_db: float, q: float, sr: int) -> np.ndarray:
    """One peaking-EQ biquad (audio-EQ-cookbook form) as a second-order section."""
    a = 10 ** (gain_db / 40)
    w0 = 2 * np.pi * f0 / sr
    alpha = np.sin(w0) / (2 * q)
    b = np.array([1 + alpha * a, -2 * np.cos(w0), 1 - alpha * a])
    den = np.array([1 + alpha / a, -2 * np.cos(w0), 1 - alpha / a])
    return np.concatenate([b / den[0], den / den[0]])[None, :]


def coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Unit-RMS noise with a 1/f^exponent power spectrum (0 white, 1 pink, 2 brown)."""
    m = sp_fft.next_fast_len(n, real=True)   # avoid slow FFT sizes with large prime factors
    spec = sp_fft.rfft(rng.standard_normal(m))
    f = np.arange(spec.size, dtype=float)
    f[0] = 1.0
    x = sp_fft.irfft(spec / f ** (exponent / 2), m)[:n]
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def band_noise(rng: np.random.Generator, n: int, sr: int, lo: float, hi: float, order: int = 2) -> np.ndarray:
    x = signal.sosfilt(_sos("bandpass", (lo, hi), sr, order), rng.standard_normal(n))
    return x / (np.sqrt(np.mean(x**2)) + 1e-12)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x**2))) if x.size else 0.0


def active_rms(x: np.ndarray, sr: int) -> float:
    """RMS over the loud frames only, so SNR refers to the events, not the silence."""
    hop = max(sr // 50, 1)
    n = x.size // hop
    if n == 0:
        return _rms(x)
    e = np.mean(x[: n * hop].reshape(n, hop) ** 2, axis=1)
    loud = e[e >= 0.05 * e.max()]
    return float(np.sqrt(loud.mean())) if loud.size else _rms(x)


def transient(rng: np.random.Generator, sr: int, coarse: bool) -> np.ndarray:
    """A crackle: a damped sinusoid with a sharp onset (fine: brief and high; coarse: longer, low)."""
    if coarse:
        f, tau, dur = rng.uniform(150, 350), rng.uniform(3e-3, 6e-3), rng.uniform(0.012, 0.02)
    else:
        f, tau, dur = rng.uniform(450, 900), rng.uniform(1e-3, 2e-3), rng.uniform(0.005, 0.008)
    f = min(f, 0.4 * sr)
    t = np.arange(max(int(dur * sr), 4)) / sr
    return np.sin(2 * np.pi * f * t + rng.uniform(-0.5, 0.5)) * np.exp(-t / tau) * (1 - np.exp(-t / 3e-4))


def tone(rng: np.random.Generator, sr: int, n: int, f_start: float, f_end: float, harmonics: int = 3) -> np.ndarray:
    """A wheeze: a gliding tone with a little vibrato and decaying harmonics, Tukey-tapered."""
    t = np.arange(n) / sr
    f = np.linspace(f_start, f_end, n) * (1 + 0.01 * np.sin(2 * np.pi * rng.uniform(3, 8) * t))
    phase = 2 * np.pi * np.cumsum(f) / sr
    y = np.zeros(n)
    for k in range(1, harmonics + 1):
        if k * max(f_start, f_end) < 0.45 * sr:
            y += (0.45 ** (k - 1)) * np.sin(k * phase + rng.uniform(0, 2 * np.pi))
    return y * signal.windows.tukey(n, 0.3)


def _add(dst: np.ndarray, src: np.ndarray, at: int) -> int:
    """Mix ``src`` into ``dst`` starting at sample ``at`` (cropped at both ends); returns samples added."""
    lo, hi = max(at, 0), min(at + src.size, dst.size)
    if hi <= lo:
        return 0
    dst[lo:hi] += src[lo - at : hi - at]
    return hi - lo


# --------------------------------------------------------------------------- coughs


def cough_event(rng: np.random.Generator, sr: int, voice: Voice, cues: CoughCues) -> tuple[np.ndarray, int]:
    """One cough (explosive + intermediate + voiced phases); returns (signal, rattle count)."""
    dry, wet = cues.dry, cues.wet
    t_exp = rng.uniform(0.025, 0.05)
    t_int = rng.uniform(0.08, 0.18) * (1 + 0.4 * wet) * (1 - 0.3 * dry)
    t_voi = rng.uniform(0.06, 0.18) * (1 - 0.5 * dry)
    n_exp, n_int, n_voi = (max(int(d * sr), 8) for d in (t_exp, t_int, t_voi))
    n = n_exp + n_int + n_voi + int(0.05 * sr)
    t = np.arange(n) / sr
    # Amplitude envelope of the turbulent (noise) part: 3 ms attack, fast decay, slow tail.
    env = np.minimum(t / 3e-3, 1.0) * (0.65 * np.exp(-t / (t_exp / 2)) + 0.35 * np.exp(-t / (t_exp + t_int / 2)))
    noise = rng.standard_normal(n) * env
    broad = signal.sosfilt(_sos("highpass", 90.0, sr), noise)
    shift = 1 - 0.12 * wet
    tract = np.zeros(n)
    for fk, q in zip(voice.formants, (4.0, 6.0, 8.0)):
        b, a = signal.iirpeak(min(fk * shift, 0.42 * sr), q, fs=sr)
        tract += signal.lfilter(b, a, noise)
    y = 0.5 * broad + tract
    if dry > 0:  # turbulent, breathy high band
        y += dry * 2.5 * band_noise(rng, n, sr, 1500, 5000) * env * _rms(tract) * 3
    if wet > 0:  # low, congested energy
        y += wet * 0.35 * band_noise(rng, n, sr, 60, 450) * env * _rms(tract) * 3
    # Voiced phase: glottal harmonics with jitter (hoarseness grows with the dry cue).
    v0 = n_exp + int(0.5 * n_int)
    nv = n - v0
    tv = np.arange(nv) / sr
    jitter = 0.01 + 0.08 * dry
    drift = np.cumsum(rng.standard_normal(nv)) / np.sqrt(max(nv, 1)) * jitter
    f0 = voice.f0 * (1 + rng.uniform(-0.1, 0.15)) * (1 - 0.2 * tv / (tv[-1] + 1e-9)) * (1 + drift)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    kmax = max(int(0.45 * sr / (voice.f0 * 1.3)), 1)
    k = np.arange(1, min(kmax, 20) + 1)[:, None]
    harm = (np.sin(k * phase[None, :]) / k**1.3).sum(axis=0)
    venv = np.sin(np.pi * np.clip(tv / (t_voi + 0.05), 0, 1)) ** 1.5
    voiced = np.zeros(nv)
    for fk, q in zip(voice.formants, (3.0, 5.0, 7.0)):
        b, a = signal.iirpeak(min(fk * shift, 0.42 * sr), q, fs=sr)
        voiced += signal.lfilter(b, a, harm)
    voiced *= venv * (1 - 0.8 * dry) * 0.6 * _rms(y[: n_exp + n_int]) / (_rms(voiced) + 1e-12)
    y[v0:] += voiced
    # Mucus rattle after the cough (wet cue): a burst of coarse transients.
    n_rattle = int(rng.poisson(8 * wet)) if wet > 0 else 0
    if n_rattle:
        tail = np.zeros(n + int(0.3 * sr))
        tail[:n] = y
        lvl = np.abs(y).max() * rng.uniform(0.12, 0.3)
        for _ in range(n_rattle):
            _add(tail, lvl * transient(rng, sr, coarse=True), int(rng.uniform(n_exp, tail.size - 0.03 * sr)))
        y = tail
    return y / (np.abs(y).max() + 1e-12), n_rattle


def render_cough(rng: np.random.Generator, sr: int, seconds: float, voice: Voice, cues: CoughCues) -> tuple[np.ndarray, dict]:
    """A clean cough recording: breaths in, then coughs, repeated while time allows."""
    n = int(seconds * sr)
    x = np.zeros(n)
    pos = int(rng.uniform(0.1, 0.6) * sr)
    want = int(rng.integers(cues.n_coughs[0], cues.n_coughs[1] + 1))
    done = rattles = 0
    while done < want:
        inhale = band_noise(rng, int(rng.uniform(0.2, 0.4) * sr), sr, 400, 3000) * rng.uniform(0.02, 0.06)
        inhale *= np.hanning(inhale.size)
        ev, r = cough_event(rng, sr, voice, cues)
        if pos + inhale.size + ev.size > n and done > 0:
            break
        _add(x, inhale, pos)
        pos += inhale.size + int(rng.uniform(0.0, 0.08) * sr)
        _add(x, ev * rng.uniform(0.5, 1.0), pos)
        pos += ev.size + int(rng.uniform(0.15, 0.7) * sr)
        done += 1
        rattles += r
    return x, {"n_coughs": done, "n_rattles": rattles}


# --------------------------------------------------------------------------- lung sounds


def render_lung(rng: np.random.Generator, sr: int, seconds: float, cues: LungCues, heart_level: float) -> tuple[np.ndarray, dict]:
    """A clean chest recording: breath cycles with crackles/wheezes, plus heart sounds."""
    n = int(seconds * sr)
    t = np.arange(n) / sr
    period = 60.0 / cues.rate_bpm
    ti = period / (1 + cues.ie_ratio)
    env = np.zeros(n)
    insp, expi = [], []   # (start, stop) sample spans of each phase
    start = -rng.uniform(0, period)
    while start < seconds:
        p = period * rng.uniform(0.9, 1.1)
        i0, i1, e1 = start, start + ti * p / period, start + p
        insp.append((i0, i1))
        expi.append((i1, e1))
        for (a, b), lvl in (((i0, i1), 1.0), ((i1, e1), 0.55 * rng.uniform(0.8, 1.2))):
            m = (t >= a) & (t < b)
            u = (t[m] - a) / (b - a)
            env[m] = lvl * np.sin(np.pi * u) ** 0.8 * (np.exp(-1.5 * u) if lvl < 1 else 1.0)
        start = e1
    breath = band_noise(rng, n, sr, 80, 700) * (1 - cues.bronchial) + band_noise(rng, n, sr, 250, 1500) * cues.bronchial * 1.5
    x = breath * env
    ref = _rms(x) + 1e-9
    info = {"n_wheezes": 0, "n_fine_crackles": 0, "n_coarse_crackles": 0}
    # Wheezes: mostly expiratory, sometimes inspiratory; sometimes polyphonic. Only the
    # ones at least 0.1 s inside the clip are counted as present.
    for spans, pr in ((expi, cues.wheeze_prob), (insp, 0.3 * cues.wheeze_prob)):
        for a, b in spans:
            if rng.random() >= pr:
                continue
            for _ in range(1 + int(rng.random() < cues.polyphonic)):
                d = (b - a) * rng.uniform(0.4, 0.9)
                s0 = a + rng.uniform(0, (b - a) - d)
                f1 = rng.uniform(*cues.wheeze_band)
                w = tone(rng, sr, max(int(d * sr), 16), f1, f1 * rng.uniform(0.85, 1.15))
                if _add(x, w * ref * cues.wheeze_level * rng.uniform(0.6, 1.4), int(s0 * sr)) >= 0.1 * sr:
                    info["n_wheezes"] += 1
    # Crackles ride on the breath sound: several times its local level, so they stay
    # audible on a loud inspiration. Fine ones come late in inspiration; coarse ones
    # early in inspiration and during expiration.
    def crackle(at_s: float, coarse: bool) -> None:
        i = int(at_s * sr)
        if 0 <= i < n:
            level = max(env[i], 0.25) * rng.uniform(6, 14)
            _add(x, transient(rng, sr, coarse=coarse) * level, i)
            info["n_coarse_crackles" if coarse else "n_fine_crackles"] += 1

    for a, b in insp:
        for _ in range(int(rng.poisson(cues.fine_crackles))):
            crackle(a + (b - a) * rng.beta(4, 1.5), coarse=False)
    for (a, b), (c, d) in zip(insp, expi):
        for _ in range(int(rng.poisson(cues.coarse_crackles))):
            crackle(a + (b - a) * rng.beta(1.5, 4) if rng.random() < 0.6 else c + (d - c) * rng.random(), coarse=True)
    # Heart sounds S1/S2: low damped thumps, a nuisance every recording has.
    hr = rng.uniform(60, 100) / 60.0
    beat = rng.uniform(0, 1 / hr)
    tt = np.arange(int(0.09 * sr)) / sr
    while beat < seconds:
        for off, f, lvl in ((0.0, rng.uniform(40, 60), 1.0), (0.3, rng.uniform(55, 75), 0.7)):
            thump = np.sin(2 * np.pi * f * tt) * np.exp(-tt / 0.025) * lvl
            _add(x, thump * ref * heart_level * 3, int((beat + off) * sr))
        beat += 1 / hr * rng.uniform(0.95, 1.05)
    return x, info


# --------------------------------------------------------------------------- channel


def apply_channel(rng: np.random.Generator, x: np.ndarray, sr: int, ch: Channel, mode: str = "") -> tuple[np.ndarray, dict]:
    """Colour ``x`` like a device, add the environment's noise, and set a random gain."""
    y = signal.sosfilt(_sos("highpass", rng.uniform(*ch.highpass), sr), x)
    lp = rng.uniform(*ch.lowpass)
    if mode == "bell":          # low-frequency emphasis (heart, low breath sounds)
        lp = min(lp, rng.uniform(700, 1000))
    elif mode == "diaphragm":   # cuts the lows, keeps the highs
        y = signal.sosfilt(_sos("highpass", rng.uniform(180, 260), sr), y)
    if lp < 0.45 * sr:
        y = signal.sosfilt(_sos("lowpass", lp, sr, order=4), y)
    for _ in range(ch.eq_bands):
        f0 = float(np.exp(rng.uniform(np.log(150), np.log(min(5000, 0.4 * sr)))))
        y = signal.sosfilt(_peaking(f0, rng.uniform(-6, 6), rng.uniform(0.7, 2.0), sr), y)
    sig = active_rms(y, sr)
    snr = rng.uniform(*ch.snr_db)
    noise = coloured_noise(rng, y.size, rng.uniform(*ch.noise_colour))
    t = np.arange(y.size) / sr
    if rng.random() < ch.hum_prob:
        mains = 50.0 if rng.random() < 0.5 else 60.0
        noise += sum(0.8 / k * np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 6.3)) for k in (1, 2, 3))
    if rng.random() < ch.babble_prob:
        mod = 0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(3, 6) * t) * np.sin(2 * np.pi * rng.uniform(0.2, 0.7) * t)
        noise += band_noise(rng, y.size, sr, 300, 3000) * mod * rng.uniform(0.5, 1.5)
    clicks = int(rng.poisson(ch.artifact_rate * y.size / sr))
    for _ in range(clicks):  # stethoscope friction / handling: crackle look-alikes
        c = transient(rng, sr, coarse=rng.random() < 0.5) * rng.uniform(2, 8) * sig
        _add(y, c, int(rng.integers(0, y.size)))
    y = y + noise / (_rms(noise) + 1e-12) * sig * 10 ** (-snr / 20)
    clipped = rng.random() < ch.clip_prob
    if clipped:  # automatic gain control driven into saturation
        drive = rng.uniform(1.5, 4.0)
        y = np.tanh(drive * y / (np.abs(y).max() + 1e-12)) / np.tanh(drive)
    y = y / (np.abs(y).max() + 1e-12) * rng.uniform(0.25, 0.9)
    return y, {"snr_db": round(float(snr), 2), "clipped": bool(clipped), "artifacts": clicks}


# --------------------------------------------------------------------------- files

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def encode_audio(x: np.ndarray, sr: int, fmt: str) -> bytes:
    """Encode mono float audio as ``wav`` (16-bit), ``wav24``, ``flac`` or ``ogg`` (Opus) bytes.

    Every encoding is bit-exact for the same input: libsndfile's Ogg/Vorbis
    writer picks a random stream serial number, so Ogg goes through PyAV's
    Opus encoder with the container's ``bitexact`` flag instead.
    """
    import soundfile as sf

    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    buf = io.BytesIO()
    if fmt in ("wav", "wav24", "flac"):
        sub = "PCM_24" if fmt == "wav24" else "PCM_16"
        sf.write(buf, x, sr, format="FLAC" if fmt == "flac" else "WAV", subtype=sub)
        return buf.getvalue()
    if fmt == "ogg":
        if sr not in OPUS_RATES:
            raise DataError(f"Opus cannot encode {sr} Hz audio (supported: {OPUS_RATES})")
        import av

        with av.open(buf, "w", format="ogg", container_options={"fflags": "+bitexact"}) as out:
            stream = out.add_stream("libopus", rate=sr, layout="mono")
            frame = av.AudioFrame.from_ndarray(x.astype(np.float32)[None, :], format="flt", layout="mono")
            frame.sample_rate = sr
            for pkt in stream.encode(frame):
                out.mux(pkt)
            for pkt in stream.encode(None):
                out.mux(pkt)
        return buf.getvalue()
    raise DataError(f"unknown simulated audio format {fmt!r}")
