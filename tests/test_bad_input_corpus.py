"""A bad-input corpus, generated here (no binary file is committed), run through every entry point.

One table, :data:`CASES`, lists malformed and extreme inputs: audio (zero bytes,
truncated headers, wrong extensions, unsupported and odd codecs, NaN/inf and
overflowing samples, 1 kHz / 192 kHz, 8 channels, a 1-hour file, 10 ms, one
sample, silence, clipping) and metadata for the generic CSV dataset (broken
quoting, non-UTF-8, duplicate ids, a patient in two splits, unknown labels and
splits, wrong field counts, ...). Each case says what must happen:

* :class:`Raises` -- the single-item call raises that typed error; its message
  names the file and contains the cause;
* :class:`Accepted` -- a legitimate (if extreme) input: audio decodes to a finite
  1-D float32 array of exactly the resampled length at 16 kHz; metadata gives a
  manifest with that many records and no problems;
* :class:`Reported` (metadata rows) -- the row's problem is written to the
  prepare report, naming the CSV line (or the missing file) and the cause; the
  row is skipped, or kept when ``kept``.

The single-item calls are :func:`respiramfm.audio.load` and the ``prepare``
function for a generic CSV. The batch commands (``respiramfm embed``, ``respiramfm
prepare``, ``respiramfm predict --manifest``) are run in-process on manifests that
mix every bad item with good ones: they finish, report each bad item with its
cause, and lose no other item.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np
import pytest
import soundfile as sf
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from respiramfm.audio import DEFAULT_MAX_SECONDS, MAX_NATIVE_RATE, decode_native, load
from respiramfm.cli import main
from respiramfm.data import prepare as prepare_cmd
from respiramfm.data.records import Record, read_manifest, write_manifest
from respiramfm.encoders.store import EmbeddingStore
from respiramfm.errors import AudioDecodeError, DataError
from testkit import bombs

SR = 16000


# ============================================================================ expected outcomes


@dataclass(frozen=True)
class Raises:
    """The single-item call raises ``error``; the message names the file and contains ``text``."""

    error: type[Exception]
    text: str


@dataclass(frozen=True)
class Accepted:
    """Legitimate input. Audio: ``length`` samples at 16 kHz. Metadata: ``length`` records."""

    length: int


@dataclass(frozen=True)
class Reported:
    """A metadata row problem: listed in the prepare report and the run goes on.

    The report line names the CSV (``line N: text``) or, with ``names``, that file
    (relative to the case folder); the row is skipped unless ``kept``.
    """

    text: str
    kept: bool = False
    names: str | None = None


@dataclass(frozen=True)
class Case:
    id: str
    kind: str  # "audio" | "metadata"
    make: Callable[[Path], Path]  # writes the case into an empty folder; returns the audio file / the CSV
    expect: Raises | Accepted | Reported
    check: Callable[[np.ndarray], None] | None = None  # more about an accepted waveform
    row: str | None = None  # metadata row cases: the row, in the header of META_HEADER
    refused: str | None = None  # accepted audio with nothing to hear: predict refuses it (AudioContentError text)


def n16(frames: int, sr: int) -> int:
    """Length :func:`load` gives at 16 kHz (librosa's rule): ceil(frames * 16000 / sr)."""
    return math.ceil(frames * SR / sr)


# ============================================================================ audio generators


def tone(sr: int, seconds: float, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    y = 0.3 * np.sin(2 * np.pi * freq * t)
    if channels > 1:
        y = np.stack([y * (1 + 0.1 * c) for c in range(channels)], axis=1)
    return y.astype(np.float32)


NOISE = (0.1 * np.random.default_rng(1234).standard_normal(SR)).astype(np.float32)  # 1 s


def sf_bytes(y: np.ndarray, sr: int = SR, fmt: str = "WAV", subtype: str | None = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, y, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def half(blob: bytes) -> bytes:
    return blob[: len(blob) // 2]


def wav16() -> bytes:
    return sf_bytes(NOISE)


def with_samples(index, value) -> bytes:
    y = NOISE.copy()
    y[index] = value
    return sf_bytes(y, subtype="FLOAT")


def nan_in_one_of_eight_channels() -> bytes:
    y = tone(SR, 0.5, channels=8)
    y[100, 5] = np.nan
    return sf_bytes(y, subtype="FLOAT")


def overflowing_float() -> bytes:
    """Finite float32 samples near the float32 limit: resampling 44.1 -> 16 kHz overflows."""
    y = np.full(4410, 3e38, np.float32)
    y[::2] *= -1
    return sf_bytes(y, 44100, subtype="FLOAT")


def unknown_codec_tag() -> bytes:
    data = bytearray(wav16())
    data[20:22] = struct.pack("<H", 0x7A7A)  # fmt chunk: a codec tag nobody knows
    return bytes(data)


def pyav_audio(y: np.ndarray, fmt: str, codec: str, rate: int) -> bytes:
    """Mono float32 ``y`` (at ``rate``) encoded by FFmpeg, converted to the codec's sample format."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(y[None, :], format="fltp", layout="mono")
        frame.sample_rate = rate
        fmt_name = stream.codec_context.format.name if stream.codec_context.format else "s16"
        for f in av.AudioResampler(format=fmt_name, layout="mono", rate=rate).resample(frame):
            for packet in stream.encode(f):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def video_only(fmt: str = "matroska") -> bytes:
    """A valid container holding one tiny video frame and no audio stream."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream("ffv1", rate=1)
        stream.width, stream.height, stream.pix_fmt = 16, 16, "yuv420p"
        frame = av.VideoFrame.from_ndarray(np.zeros((16, 16, 3), np.uint8), format="rgb24")
        for packet in list(stream.encode(frame)) + list(stream.encode(None)):
            out.mux(packet)
    return buf.getvalue()


def one_hour_wav(path: Path, sr: int = 1000) -> None:
    """A real, complete 1-hour 16-bit mono WAV of silence (7.2 MB, written sparse: instant)."""
    data_bytes = 3600 * sr * 2
    header = (b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
              + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, sr, sr * 2, 2, 16)
              + b"data" + struct.pack("<I", data_bytes))
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + data_bytes)


def audio(name: str, build: Callable[[], bytes]) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        path = folder / name
        path.write_bytes(build())
        return path

    return make


def make_one_hour(folder: Path) -> Path:
    path = folder / "one_hour_1khz.wav"
    one_hour_wav(path)
    return path


# ---------------------------------------------------------------------------- checks on accepted audio


def all_zero(y: np.ndarray) -> None:
    assert not y.any()


def clipped_at_full_scale(y: np.ndarray) -> None:
    assert abs(float(np.abs(y).max()) - 1.0) < 1e-4 and (np.abs(y) > 0.999).mean() > 0.3


def mean_of_eight_channels(y: np.ndarray) -> None:
    assert abs(float(np.abs(y).max()) - 0.3 * 1.35) < 2e-3  # channel c is (1 + 0.1 c) * tone


def dominant_hz(expected: float) -> Callable[[np.ndarray], None]:
    def check(y: np.ndarray) -> None:
        spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
        assert abs(np.argmax(spec) * SR / len(y) - expected) < 5

    return check


def one_hour_lifts_with_max_seconds_none(path: Path) -> None:
    """The limit is the only reason: without it the hour decodes (at its own rate: 3.6 M zeros)."""
    y, sr = decode_native(path, max_seconds=None)
    assert (sr, y.shape, y.dtype, bool(y.any())) == (1000, (3_600_000,), np.float32, False)


AUDIO_CASES = [
    # -- empty, truncated, corrupt
    Case("zero_bytes", "audio", audio("zero_bytes.wav", lambda: b""), Raises(AudioDecodeError, "empty file (0 bytes)")),
    Case("truncated_header", "audio", audio("truncated_header.wav", lambda: wav16()[:30]),
         Raises(AudioDecodeError, "cannot decode wav content")),
    Case("header_only", "audio", audio("header_only.wav", lambda: wav16()[:44]),
         Raises(AudioDecodeError, "truncated: data chunk declares 32000 bytes, file holds 0")),
    Case("truncated_data", "audio", audio("truncated_data.wav", lambda: wav16()[:19244]),
         Raises(AudioDecodeError, "truncated: data chunk declares 32000 bytes, file holds 19200")),
    Case("zero_length_data", "audio", audio("zero_length_data.wav", lambda: sf_bytes(np.zeros(0, np.float32))),
         Raises(AudioDecodeError, "no audio samples")),
    Case("truncated_flac", "audio", audio("truncated.flac", lambda: sf_bytes(NOISE, fmt="FLAC")[:20000]),
         Raises(AudioDecodeError, "corrupt flac data")),
    Case("truncated_ogg", "audio", audio("truncated.ogg", lambda: half(sf_bytes(NOISE, fmt="OGG", subtype=None))),
         Raises(AudioDecodeError, "no audio samples (zero-length data, or truncated)")),
    Case("truncated_webm", "audio",
         audio("truncated.webm", lambda: half(pyav_audio(tone(48000, 1.0), "webm", "libopus", 48000))),
         Raises(AudioDecodeError, "truncated or corrupt")),
    Case("random_bytes", "audio", audio("random.bin", lambda: np.random.default_rng(3).bytes(4096)),
         Raises(AudioDecodeError, "cannot decode unrecognised content")),
    # -- wrong extension: content decides, never the name
    Case("flac_named_wav", "audio", audio("really_flac.wav", lambda: sf_bytes(NOISE, fmt="FLAC")), Accepted(SR)),
    Case("wav_named_mp3", "audio", audio("really_wav.mp3", lambda: sf_bytes(tone(SR, 0.5))), Accepted(8000),
         check=dominant_hz(440)),
    Case("csv_named_wav", "audio", audio("spreadsheet.wav", lambda: b"patient id,age\n101,3\n" * 50),
         Raises(AudioDecodeError, "cannot decode unrecognised content")),
    Case("png_named_wav", "audio", audio("picture.wav", lambda: b"\x89PNG\r\n\x1a\n" + bytes(300)),
         Raises(AudioDecodeError, "no audio stream in the container")),  # FFmpeg opens it as an image
    # -- codecs: unsupported, no audio at all, odd but decodable
    Case("unknown_codec_tag", "audio", audio("codec_7a7a.wav", unknown_codec_tag),
         Raises(AudioDecodeError, "cannot decode wav content")),
    Case("video_only_container", "audio", audio("video_only.webm", video_only),
         Raises(AudioDecodeError, "no audio stream in the container")),
    Case("g722_in_wav", "audio", audio("g722.wav", lambda: pyav_audio(tone(SR, 1.0), "wav", "g722", SR)),
         Accepted(SR), check=dominant_hz(440)),
    Case("wavpack", "audio", audio("clip.wv", lambda: pyav_audio(tone(SR, 1.0), "wv", "wavpack", SR)),
         Accepted(SR), check=dominant_hz(440)),
    # -- non-finite samples
    Case("nan_sample", "audio", audio("nan.wav", lambda: with_samples(4000, np.nan)),
         Raises(AudioDecodeError, "1 of 16000 samples are NaN or infinite (first at 0.250 s)")),
    Case("inf_samples", "audio", audio("inf.wav", lambda: with_samples(slice(9000, 9010), -np.inf)),
         Raises(AudioDecodeError, "10 of 16000 samples are NaN or infinite (first at 0.562 s)")),
    Case("all_nan", "audio", audio("all_nan.wav", lambda: sf_bytes(np.full(500, np.nan, np.float32), subtype="FLOAT")),
         Raises(AudioDecodeError, "every sample is NaN or infinite")),
    Case("nan_in_8ch", "audio", audio("nan_8ch.wav", nan_in_one_of_eight_channels),
         Raises(AudioDecodeError, "1 of 64000 samples are NaN or infinite (first at 0.006 s)")),
    Case("overflowing_float", "audio", audio("huge_float.wav", overflowing_float),
         Raises(AudioDecodeError, "sample values too large")),
    # -- legitimate but extreme
    Case("rate_1khz", "audio", audio("rate_1k.wav", lambda: sf_bytes(tone(1000, 1.0, freq=200), 1000)),
         Accepted(n16(1000, 1000)), check=dominant_hz(200)),
    Case("rate_192khz", "audio", audio("rate_192k.wav", lambda: sf_bytes(tone(192000, 0.5), 192000)),
         Accepted(n16(96000, 192000)), check=dominant_hz(440)),
    Case("eight_channels", "audio", audio("eight_ch.wav", lambda: sf_bytes(tone(SR, 0.5, channels=8))),
         Accepted(8000), check=mean_of_eight_channels),
    Case("ten_ms", "audio", audio("ten_ms.wav", lambda: sf_bytes(tone(44100, 0.01), 44100)), Accepted(n16(441, 44100)),
         refused="too short to score: 0.010 s of sound after trimming (minimum 0.1 s)"),
    Case("one_sample", "audio", audio("one_sample.wav", lambda: sf_bytes(np.array([0.25], np.float32))), Accepted(1),
         refused="too short to score: 0.000 s"),
    Case("silent", "audio", audio("silent.wav", lambda: sf_bytes(np.zeros(8000, np.float32))), Accepted(8000),
         check=all_zero, refused="silent: no signal (all samples equal) (below -60 dBFS)"),
    Case("silent_3s", "audio", audio("silent_3s.wav", lambda: bombs.silent_wav(3.0)), Accepted(48000), check=all_zero,
         refused="silent: no signal"),
    Case("dither_only", "audio", audio("dither.wav", lambda: sf_bytes(np.tile([-2.0**-15, 2.0**-15], 8000), subtype="FLOAT")),
         Accepted(16000), refused="silent: peak -90.3 dBFS (below -60 dBFS)"),
    Case("clipped", "audio", audio("clipped.wav", lambda: sf_bytes(np.clip(5 * tone(SR, 0.5), -1, 1))),
         Accepted(8000), check=clipped_at_full_scale),
    # a 1-hour recording exceeds the default max_seconds (10 min): rejected from the header, before decoding
    Case("one_hour", "audio", make_one_hour,
         Raises(AudioDecodeError, f"recording is longer than max_seconds={DEFAULT_MAX_SECONDS:g} s (3600.0 s)")),
    # -- decode bombs declared by the header: refused before a sample is decoded (issue 17)
    Case("flac_rate_1mhz", "audio",
         audio("rate_1mhz.flac", lambda: bombs.patch_flac(bombs.flac_silence(48000, 1.0), rate=1_048_575,
                                                           total=int(119.9 * 1_048_575))),
         Raises(AudioDecodeError, f"sample rate 1048575 Hz is above the maximum of {MAX_NATIVE_RATE} Hz")),
    Case("wav_rate_2147483647", "audio", audio("rate_2g.wav", lambda: bombs.wav_declaring_rate(2_147_483_647)),
         Raises(AudioDecodeError, "sample rate 2147483647 Hz is above the maximum")),
    Case("wavpack_rate_16mhz", "audio", audio("rate_16mhz.wv", lambda: bombs.wavpack_silence(16_700_000, 0.05)),
         Raises(AudioDecodeError, "sample rate 16700000 Hz is above the maximum")),
    Case("flac_384k_declares_200s", "audio",
         audio("declares_200s.flac", lambda: bombs.patch_flac(bombs.flac_silence(384_000, 1.0), total=384_000 * 200)),
         Raises(AudioDecodeError, f"over the decoded-samples budget of {int(DEFAULT_MAX_SECONDS * 96_000)} samples: "
                                  "the header declares 76800000")),
]
EXTRA_AUDIO_CHECKS = {"one_hour": one_hour_lifts_with_max_seconds_none}


# ============================================================================ metadata (generic CSV dataset)

META_HEADER = "id,who,label,split,age,audio"
COLUMNS = "record_id=id,patient_id=who,diagnosis=label,audio_path=audio"  # split, age: implicit (same names)
LABELS = "tb,non-tb"


def csv_file(text: str | bytes, audio_files: tuple[str, ...] = ()) -> Callable[[Path], Path]:
    """A case folder with ``meta.csv`` holding ``text`` and small valid WAVs named ``audio_files``."""

    def make(folder: Path) -> Path:
        path = folder / "meta.csv"
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        for name in audio_files:
            (folder / name).write_bytes(sf_bytes(tone(SR, 0.25)))
        return path

    return make


def row_case(case_id: str, row: str, expect: Reported) -> Case:
    return Case(case_id, "metadata", csv_file(f"{META_HEADER}\n{row}\n"), expect, row=row)


def make_absent(folder: Path) -> Path:
    return folder / "meta.csv"


def make_directory(folder: Path) -> Path:
    (folder / "meta.csv").mkdir()
    return folder / "meta.csv"


GOOD_ROW = "a1,P1,tb,train,34,a1.wav"

METADATA_CASES = [
    # -- the whole file is untrustworthy: a typed error naming the CSV
    Case("broken_quoting", "metadata", csv_file(f'{META_HEADER}\n"a1"x,P1,tb,train,34,a1.wav\n', ("a1.wav",)),
         Raises(DataError, "malformed metadata CSV at line 2: ',' expected after '\"'")),
    Case("unterminated_quote", "metadata", csv_file(f'{META_HEADER}\n"a1,P1,tb,train,34,a1.wav\n', ("a1.wav",)),
         Raises(DataError, "malformed metadata CSV at line 2: unexpected end of data")),
    Case("non_utf8_latin1", "metadata",
         csv_file(f"{META_HEADER}\nb\xe9b\xe9,P1,tb,train,34,a1.wav\n".encode("latin-1"), ("a1.wav",)),
         Raises(DataError, "metadata CSV is not UTF-8 text (bad byte 0xe9 at offset 30, line 2)")),
    Case("non_utf8_utf16", "metadata", csv_file(f"{META_HEADER}\n{GOOD_ROW}\n".encode("utf-16"), ("a1.wav",)),
         Raises(DataError, "metadata CSV is not UTF-8 text (bad byte 0xff at offset 0, line 1)")),
    Case("duplicate_record_id", "metadata",
         csv_file(f"{META_HEADER}\n{GOOD_ROW}\na1,P2,non-tb,test,50,a1.wav\n", ("a1.wav",)),
         Raises(DataError, "record id 'a1' appears on lines 2 and 3")),
    Case("patient_in_two_splits", "metadata",
         csv_file(f"{META_HEADER}\n{GOOD_ROW}\na2,P1,tb,test,34,a2.wav\n", ("a1.wav", "a2.wav")),
         Raises(DataError, "1 patient(s) appear in more than one split: tbscreen/P1 (tbscreen) in test+train")),
    Case("missing_column", "metadata", csv_file("id,who,split,age,audio\na1,P1,train,34,a1.wav\n", ("a1.wav",)),
         Raises(DataError, "metadata CSV lacks required column(s) ['label']")),
    Case("duplicate_column", "metadata", csv_file(f"{META_HEADER},label\n{GOOD_ROW},tb\n", ("a1.wav",)),
         Raises(DataError, "metadata CSV has duplicate column name(s) ['label']")),
    Case("empty_csv", "metadata", csv_file(b""), Raises(DataError, "metadata CSV is empty (no header row)")),
    Case("csv_absent", "metadata", make_absent, Raises(DataError, "metadata CSV not found")),
    Case("csv_is_directory", "metadata", make_directory, Raises(DataError, "metadata CSV is a directory")),
    Case("field_too_large", "metadata",
         csv_file(f"{META_HEADER}\na1,{'P' * 200_000},tb,train,34,a1.wav\n", ("a1.wav",)),
         Raises(DataError, "malformed metadata CSV at line 2: field larger than field limit")),
    # -- one bad row: reported, the rest of the file goes on
    row_case("unknown_label", "u1,P11,flu,train,40,",
             Reported("label 'flu' is not one of ['non-tb', 'tb']; row skipped")),
    row_case("unknown_split", "u2,P12,tb,holdout,40,",
             Reported("unknown split 'holdout' (train/val/test); row skipped")),
    row_case("too_many_fields", "u3,P13,tb,train,40,,surplus", Reported("7 fields, header has 6; row skipped")),
    row_case("too_few_fields", "u4,P14,tb", Reported("3 fields, header has 6; row skipped")),
    row_case("empty_record_id", ",P15,tb,train,40,", Reported("empty record id; row skipped")),
    row_case("missing_audio_file", "u6,P16,tb,train,40,ghost.wav",
             Reported("audio missing; kept as a metadata-only record", kept=True, names="ghost.wav")),
    row_case("unusable_age", "u7,P17,non-tb,test,abc,",
             Reported("age 'abc' is not a usable age; left unreported", kept=True)),
    # -- legitimate variants
    Case("utf8_bom", "metadata", csv_file(f"\ufeff{META_HEADER}\n{GOOD_ROW}\n", ("a1.wav",)), Accepted(1)),
    Case("crlf_line_ends", "metadata", csv_file(f"{META_HEADER}\r\n{GOOD_ROW}\r\na2,P2,non-tb,,,\r\n", ("a1.wav",)),
         Accepted(2)),
]

CASES = AUDIO_CASES + METADATA_CASES


def test_corpus_size_and_ids():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) >= 30
    assert {c.kind for c in CASES} == {"audio", "metadata"}
    assert all(isinstance(c.expect, (Raises, Accepted)) for c in AUDIO_CASES)
    assert all((c.row is not None) == isinstance(c.expect, Reported) for c in METADATA_CASES)


# ============================================================================ single-item calls


def prepare_args(csv_path: Path, out: Path) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    prepare_cmd.add_arguments(parser)
    return parser.parse_args(["generic", "--root", str(csv_path.parent), "--csv", csv_path.name,
                              "--dataset", "tbscreen", "--columns", COLUMNS, "--labels", LABELS, "--out", str(out)])


def report_has(report: str, names: Path, text: str) -> bool:
    return any(line.startswith(f"{names}\t") and text in line for line in report.splitlines())


@pytest.mark.parametrize("case", AUDIO_CASES, ids=lambda c: c.id)
def test_audio_single_item(case: Case, tmp_path):
    path = case.make(tmp_path)
    if isinstance(case.expect, Raises):
        with pytest.raises(case.expect.error) as info:
            load(path)
        err = info.value
        assert err.path == str(path) and str(err).startswith(f"{path}: ")
        assert case.expect.text in err.cause and case.expect.text in str(err)
    else:
        y = load(path)
        assert y.dtype == np.float32 and y.ndim == 1 and y.shape == (case.expect.length,)
        assert np.isfinite(y).all()
        if case.check is not None:
            case.check(y)
    if case.id in EXTRA_AUDIO_CHECKS:
        EXTRA_AUDIO_CHECKS[case.id](path)


@pytest.mark.parametrize("case", METADATA_CASES, ids=lambda c: c.id)
def test_metadata_single_item(case: Case, tmp_path):
    csv_path = case.make(tmp_path)
    out = tmp_path / "out" / "manifest.csv"
    args = prepare_args(csv_path, out)
    report_path = out.with_name(out.name + ".report.txt")
    expect = case.expect
    if isinstance(expect, Raises):
        with pytest.raises(expect.error) as info:
            prepare_cmd.prepare(args)
        err = info.value
        assert err.path == str(csv_path) and str(err).startswith(f"{csv_path}: ")
        assert expect.text in err.cause
        assert not out.exists()
        return
    if isinstance(expect, Reported) and not expect.kept:
        # the only row is skipped: nothing to write, a typed error pointing at the report
        with pytest.raises(DataError, match="no records could be built") as info:
            prepare_cmd.prepare(args)
        assert info.value.path == str(tmp_path) and not out.exists()
        assert report_has(report_path.read_text(), csv_path, f"line 2: {expect.text}")
        return
    records, problems, report = prepare_cmd.prepare(args)
    assert read_manifest(out) == records
    if isinstance(expect, Accepted):
        assert len(records) == expect.length and problems == []
        assert records[0].record_id == "tbscreen/a1" and records[0].audio_path == "../a1.wav"
        return
    (rec,) = records  # kept, and reported
    named = tmp_path / expect.names if expect.names else csv_path
    text = expect.text if expect.names else f"line 2: {expect.text}"
    assert report_has(report.read_text(), named, text)
    assert rec.audio_path == "" and rec.age == (None if case.id == "unusable_age" else 40.0)


# ============================================================================ batch commands


@pytest.fixture(scope="module")
def audio_corpus(tmp_path_factory):
    """Every audio case plus four good recordings, in one manifest (paths relative to it)."""
    root = tmp_path_factory.mktemp("corpus")
    recs, files = [], {}
    for i, (sr, seconds, freq) in enumerate([(SR, 1.0, 300), (44100, 0.7, 500), (8000, 2.0, 700), (48000, 0.3, 900)]):
        path = root / "good" / f"good{i}.wav"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(sf_bytes(tone(sr, seconds, freq), sr))
        files[f"good{i}"] = path
    for case in AUDIO_CASES:
        folder = root / "bad" / case.id
        folder.mkdir(parents=True)
        files[case.id] = case.make(folder)
    for i, (rid, path) in enumerate(files.items()):
        recs.append(Record(record_id=rid, patient_id=f"p{i}", dataset="corpus", audio_type="cough",
                           audio_path=str(path.relative_to(root)), age=40.0 + i, sex="female", symptoms="cough"))
    manifest = write_manifest(recs, root / "manifest.csv")
    good = {rid for rid in files if rid.startswith("good")}
    good |= {c.id for c in AUDIO_CASES if isinstance(c.expect, Accepted)}
    bad = {c.id: c for c in AUDIO_CASES if isinstance(c.expect, Raises)}
    assert len(good) + len(bad) == len(recs) and len(bad) >= 15
    return manifest, files, good, bad


def test_embed_batch_reports_every_bad_item_and_loses_none(audio_corpus, tmp_path, capsys):
    manifest, files, good, bad = audio_corpus
    out = tmp_path / "store"
    rc = main(["embed", "--manifest", str(manifest), "--encoder", "logmel-stats", "--out", str(out),
               "--batch-size", "8", "--no-progress"])
    assert rc == 0
    n = len(files)
    assert f"embedded {len(good)}/{n} records" in capsys.readouterr().out
    store = EmbeddingStore(out)
    assert set(store.ids) == good
    X = store.rows(store.ids)
    assert X.shape == (len(good), 384) and X.dtype == np.float32 and np.isfinite(X).all()
    errors = {e["record_id"]: e for e in store.errors}
    assert set(errors) == set(bad)
    for rid, case in bad.items():
        assert errors[rid]["path"] == str(files[rid]), rid
        assert case.expect.text in errors[rid]["cause"], (rid, errors[rid]["cause"])
    counts = store.meta["counts"]
    assert (counts["records"], counts["embedded"], counts["errors"], counts["skipped"]) == (n, len(good), len(bad), 0)
    assert counts["records"] == counts["embedded"] + counts["errors"]  # nothing lost


def test_prepare_batch_keeps_good_rows_and_reports_bad_ones(tmp_path, capsys):
    """Good rows, every row-level bad case and a row whose audio is undecodable, in one CSV."""
    folder = tmp_path / "data"
    folder.mkdir()
    good_rows = ["g1,P1,tb,train,34,g1.wav", "g2,P1,tb,train,34,g2.wav", "g3,P2,non-tb,test,61,g3.wav",
                 "g4,P3,non-tb,,,", "g5,P4,tb,val,29,g5.flac"]
    for name in ("g1.wav", "g2.wav", "g3.wav"):
        (folder / name).write_bytes(sf_bytes(tone(SR, 0.25)))
    (folder / "g5.flac").write_bytes(b"")  # undecodable audio: prepare does not decode, embed reports it
    row_cases = [c for c in METADATA_CASES if c.row is not None]
    lines = [META_HEADER]
    for g, c in zip(good_rows, row_cases):  # interleave good and bad rows
        lines += [g, c.row]
    lines += good_rows[len(row_cases):] + [c.row for c in row_cases[len(good_rows):]]
    (folder / "meta.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "manifest.csv"
    rc = main(["prepare", "generic", "--root", str(folder), "--csv", "meta.csv", "--dataset", "tbscreen",
               "--columns", COLUMNS, "--labels", LABELS, "--out", str(out)])
    assert rc == 0
    kept = [c for c in row_cases if c.expect.kept]
    skipped = [c for c in row_cases if not c.expect.kept]
    records = {r.record_id: r for r in read_manifest(out)}
    expected_ids = {f"tbscreen/{row.split(',')[0]}" for row in good_rows + [c.row for c in kept]}
    assert set(records) == expected_ids  # every good row is there
    assert records["tbscreen/g1"].audio_path == "../data/g1.wav" and records["tbscreen/g4"].audio_path == ""
    assert records["tbscreen/g5"].audio_path == "../data/g5.flac" and records["tbscreen/u6"].audio_path == ""
    report = out.with_name("manifest.csv.report.txt").read_text()
    csv_path = folder / "meta.csv"
    for c in row_cases:
        line_no = lines.index(c.row) + 1
        if c.expect.names:
            assert report_has(report, folder / c.expect.names, c.expect.text), c.id
        else:
            assert report_has(report, csv_path, f"line {line_no}: {c.expect.text}"), c.id
    assert f"problems: {len(row_cases)}" in report
    assert len(good_rows) + len(row_cases) == len(records) + len(skipped)  # nothing lost
    assert f"{len(records)} records" in capsys.readouterr().out

    # the undecodable file prepare let through is embed's to report; every other record is kept
    store = tmp_path / "store"
    rc = main(["embed", "--manifest", str(out), "--encoder", "logmel-stats", "--out", str(store), "--no-progress"])
    assert rc == 0
    emb = EmbeddingStore(store)
    assert set(emb.ids) == {"tbscreen/g1", "tbscreen/g2", "tbscreen/g3"}
    assert [(e["record_id"], e["path"], e["cause"]) for e in emb.errors] == [
        ("tbscreen/g5", str(out.parent / "../data/g5.flac"), "empty file (0 bytes)")]
    assert sorted(s["record_id"] for s in emb.skipped) == ["tbscreen/g4", "tbscreen/u6", "tbscreen/u7"]


@pytest.mark.parametrize("case", [c for c in METADATA_CASES if isinstance(c.expect, Raises)], ids=lambda c: c.id)
def test_prepare_cli_structural_errors_are_clean(case: Case, tmp_path, capsys):
    """A file that cannot be trusted stops the command cleanly: exit 1, file and cause on stderr, no manifest."""
    csv_path = case.make(tmp_path)
    out = tmp_path / "out.csv"
    rc = main(["prepare", "generic", "--root", str(tmp_path), "--csv", "meta.csv", "--dataset", "tbscreen",
               "--columns", COLUMNS, "--labels", LABELS, "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and f"respiramfm prepare: error: {csv_path}: " in err and case.expect.text in err
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, opera_fixtures, one_thread):
    from respiramfm.serve.tiny import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model",
                            opera_fixtures / "opera_ct_tiny_seed0.safetensors")


def test_predict_manifest_batch_reports_bad_rows_and_loses_none(audio_corpus, tiny_model_dir, tmp_path, capsys):
    manifest, files, good, bad = audio_corpus
    refused = {c.id: c.refused for c in AUDIO_CASES if c.refused}  # decodes, but nothing to hear: not scored
    good = good - set(refused)
    out = tmp_path / "preds.csv"
    rc = main(["predict", "--model", str(tiny_model_dir), "--manifest", str(manifest), "--task", "T4",
               "--out", str(out), "--batch-size", "8"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["records"], summary["predicted"], summary["errors"]) == (len(files), len(good),
                                                                           len(bad) + len(refused))
    rows = list(csv.DictReader(out.open(encoding="utf-8")))
    assert {r["record_id"] for r in rows} == good and len(rows) == len(good)
    for r in rows:
        p = float(r["probability"])
        assert 0.0 <= p <= 1.0 and math.isfinite(p), r
        assert r["modalities_used"] == "audio+context", r
    errors = {e["record_id"]: e for e in csv.DictReader(Path(summary["errors_file"]).open(encoding="utf-8"),
                                                       delimiter="\t")}
    assert set(errors) == set(bad) | set(refused)
    for rid, case in bad.items():
        assert errors[rid]["path"] == str(files[rid]), rid
        assert case.expect.text in errors[rid]["error"], (rid, errors[rid]["error"])
    for rid, text in refused.items():
        assert errors[rid]["path"] == str(files[rid]) and text in errors[rid]["error"], (rid, errors[rid])
    assert len(rows) + len(errors) == len(files)  # nothing lost
    assert not list(tmp_path.glob(".preds.csv*"))


# ============================================================================ decoder property


@st.composite
def waveforms(draw):
    sr = draw(st.sampled_from([8000, 11025, 16000, 22050, 44100, 48000]))
    channels = draw(st.integers(1, 8))
    frames = draw(st.integers(1, 1500))
    elements = st.floats(width=32, allow_nan=False, allow_infinity=False)
    y = draw(hnp.arrays(np.float32, (frames, channels), elements=elements))
    return y, sr


@settings(max_examples=20, deadline=None)
@given(case=waveforms())
def test_decoder_property_any_finite_waveform(case, tmp_path_factory):
    y, sr = case
    folder = tmp_path_factory.mktemp("prop")
    frames = y.shape[0]
    expected = n16(frames, sr)
    for subtype in ("PCM_16", "FLOAT"):
        path = folder / f"w_{subtype}.wav"
        sf.write(path, y, sr, subtype=subtype)
        try:
            out = load(path)
        except AudioDecodeError as exc:
            # only float samples near the float32 limit may overflow when mixed/resampled: a typed error
            assert subtype == "FLOAT" and float(np.abs(y.astype(np.float64)).max()) > 1e30, exc
            assert "sample values too large" in str(exc) and str(path) in str(exc)
            continue
        assert out.dtype == np.float32 and out.ndim == 1 and np.isfinite(out).all()
        assert out.shape == (expected,)
        assert abs(len(out) / SR - frames / sr) < 1 / SR + 1e-9  # the duration survives resampling


# ============================================================================ hostile input (issue 17)
# Decode bombs with the server's limits (max_seconds=120: a budget of 11,520,000 decoded samples), metadata
# values built to be slow or to crash a parser, and formula cells; each goes through every entry point it can
# reach, and the bombs' memory is measured.

SERVER_SECONDS = 120.0
SERVER_BUDGET = int(SERVER_SECONDS * 96_000)
BOMB_MEMORY_BOUND = 4 * SERVER_BUDGET + 16 * 2**20  # bytes: one float32 per budgeted sample, plus one block


@dataclass(frozen=True)
class Bomb:
    id: str
    text: str  # in the AudioDecodeError's cause


BOMBS = [
    Bomb("flac_1mhz_120s", "sample rate 1048575 Hz is above the maximum of 384000 Hz"),
    Bomb("flac_384k_100s_declared", "budget of 11520000 samples: the header declares 38400000"),
    Bomb("wavpack_16mhz", "sample rate 16700000 Hz is above the maximum"),
    Bomb("wav_2147483647hz", "sample rate 2147483647 Hz is above the maximum"),
    Bomb("flac_384k_40s", "budget of 11520000 samples: the header declares 15360000"),
    Bomb("flac_384k_40s_unknown_length", "budget of 11520000 samples: decoding stopped after"),
    Bomb("wavpack_384k_40s_declares_1000", "budget of 11520000 samples: decoding stopped after"),
    Bomb("wavpack_192k_70s_declares_1000", "budget of 11520000 samples: decoding stopped after"),
]

# metadata JSON for `predict --metadata` and the server's `metadata` field: (id, text, expected cause)
NESTED_24 = json.dumps({"symptoms": json.loads("[" * 24 + '"' + "x" * 65 + '"' + "]" * 24)})
METADATA_JSON_CASES = [
    ("nested_24_deep", NESTED_24, "nested more than 4 lists deep"),
    ("nested_400_deep", '{"symptoms": ' + "[" * 400 + "]" * 400 + "}", "nested too deeply: 401 levels"),
    ("nested_600_deep", '{"symptoms": ' + "[" * 600 + "]" * 600 + "}", "nested too deeply: 601 levels"),
    ("json_5000_deep", "[" * 5000, "nested too deeply: 5000 levels"),
    ("age_5000_digits", '{"age": ' + "9" * 5000 + "}", "'age' must be a non-negative number"),
    ("age_5000_digit_text", '{"age": "' + "9" * 5000 + '"}', "'age' must be a non-negative number"),
    ("symptoms_300_items", json.dumps({"symptoms": ["cough"] * 300}), "more than 256 items"),
    ("symptoms_5000_chars", json.dumps({"symptoms": "x" * 5000}), "longer than 4096 characters"),
    ("symptoms_object", '{"symptoms": {"a": 1}}', "must be text or a list of text, got dict"),
]
FORMULAS = ["=HYPERLINK(\"http://evil.example\",\"x\")", "@sum(1+1)", "+cmd|' /C calc'!A0", "-2+3", "\tx", "\r=1"]


def test_hostile_corpus_size():
    hostile = len(BOMBS) + len(METADATA_JSON_CASES) + len(FORMULAS)
    assert len({b.id for b in BOMBS}) == len(BOMBS) == len(bombs.bombs())
    assert len(CASES) + hostile >= 80  # the corpus grew from 51 cases


@pytest.mark.parametrize("bomb", BOMBS, ids=lambda b: b.id)
def test_decode_bomb_is_refused_within_memory_bound(bomb: Bomb, tmp_path):
    import tracemalloc

    data = _BOMB_CACHE[bomb.id]
    path = tmp_path / bomb.id
    path.write_bytes(data)
    for decode in (lambda: load(path, max_seconds=SERVER_SECONDS),
                   lambda: decode_native(path, max_seconds=SERVER_SECONDS)):
        tracemalloc.start()
        try:
            with pytest.raises(AudioDecodeError) as info:
                decode()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert bomb.text in info.value.cause and info.value.path == str(path), info.value
        assert peak < BOMB_MEMORY_BOUND, f"{bomb.id}: {peak / 2**20:.0f} MiB"
        assert len(data) < 128 * 1024  # each is a small file


_BOMB_CACHE: dict[str, bytes] = {}


@pytest.fixture(scope="module", autouse=True)
def _bombs_once():
    _BOMB_CACHE.update(bombs.bombs())  # generated once per module (about a second)
    yield
    _BOMB_CACHE.clear()


@pytest.mark.parametrize("case", METADATA_JSON_CASES, ids=lambda c: c[0])
def test_predict_metadata_is_a_typed_error_in_linear_time(case, tiny_model_dir, capsys):
    import time

    _, text, cause = case
    t0 = time.perf_counter()
    rc = main(["predict", "--model", str(tiny_model_dir), "--metadata", text, "--task", "T4"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("respiramfm predict: error:") and cause in err, err[:300]
    assert "Traceback" not in err and time.perf_counter() - t0 < 10


@pytest.mark.parametrize("case", [c for c in AUDIO_CASES if c.refused], ids=lambda c: c.id)
def test_predict_refuses_audio_with_nothing_to_hear(case: Case, tiny_model_dir, tmp_path, capsys):
    path = case.make(tmp_path)
    rc = main(["predict", "--model", str(tiny_model_dir), "--audio", str(path), "--symptoms", "cough", "--task", "T4"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"respiramfm predict: error: {path}: ") and case.refused in err, err[:300]


def test_formula_cells_are_neutralised_in_written_csvs(tmp_path):
    """prepare -> manifest: formula-looking cells get an apostrophe on disk; reading the manifest undoes it."""
    folder = tmp_path / "data"
    folder.mkdir()
    rows = [f'f{i},P{i},tb,train,34,,"{f.replace(chr(34), chr(34) * 2)}"' for i, f in enumerate(FORMULAS)]
    (folder / "meta.csv").write_text(f"{META_HEADER},device\n" + "\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "manifest.csv"
    records, problems, _ = prepare_cmd.prepare(prepare_args(folder / "meta.csv", out))
    assert problems == [] and len(records) == len(FORMULAS)
    written = list(csv.reader(out.open(encoding="utf-8", newline="")))
    device = written[0].index("device")
    neutralised = 0
    for line, rec in zip(written[1:], records):
        cell = line[device]
        assert not cell.startswith(("=", "+", "-", "@", "\t", "\r")), cell  # nothing a spreadsheet would run
        if rec.device[:1] in ("=", "+", "-", "@", "\t", "\r"):
            assert cell == "'" + rec.device, (cell, rec.device)
            neutralised += 1
    assert neutralised >= 4
    assert [r.device for r in read_manifest(out)] == [r.device for r in records]  # the round trip is exact


def test_server_answers_every_hostile_input_with_a_4xx(tiny_model_dir):
    """The same corpus through HTTP: bombs, nothing-to-hear audio and metadata; JSON 4xx with the notice."""
    from fastapi.testclient import TestClient

    from respiramfm.serve.app import create_app

    client = TestClient(create_app(tiny_model_dir))  # the server's own limits (max_seconds=120)

    def check(r, statuses, text):
        assert r.status_code in statuses, r.text[:300]
        body = r.json()
        assert set(body) == {"error", "detail", "notice"} and text in json.dumps(body["detail"]), body

    for bomb in BOMBS:
        check(client.post("/predict", data={"task": "T4"}, files={"audio": (bomb.id, _BOMB_CACHE[bomb.id])}),
              (400, 413), bomb.text)
    for case in [c for c in AUDIO_CASES if c.refused]:
        folder = Path(tempfile.mkdtemp())
        data = case.make(folder).read_bytes()
        check(client.post("/predict", data={"task": "T4"}, files={"audio": ("a.wav", data)}), (422,), case.refused)
    for _, text, cause in METADATA_JSON_CASES:
        if len(text) <= 16384:  # longer ones are refused for their size first
            check(client.post("/predict", data={"task": "T4", "metadata": text}), (400,), cause)


def test_csv_cell_rule_and_its_exact_inverse():
    from respiramfm.utils.io import csv_cell, csv_value

    for formula in FORMULAS + ["'=x", "''@y", "-cmd", "+A1"]:
        cell = csv_cell(formula)
        assert cell == "'" + formula and csv_value(cell) == formula, formula
    for plain in ["-3.5", "+1e-3", "-", "=", "ok", "'ok", "a=b", "", "12"]:
        assert csv_cell(plain) == plain and csv_value(plain) == plain, plain
    assert csv_cell(-2) == -2 and csv_cell(None) is None  # only text is touched
