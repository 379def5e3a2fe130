"""Generative Qwen2-Audio baseline (docs/paper.md §5): prompt with the classes, generate, parse, score.

Qwen2-Audio is a *generative* audio-language model; it has no classification head, so:

* the audio (resampled to 16 kHz, at most 30 s: Whisper's window) goes in through the
  processor (``audio=``; ``audios=`` is deprecated) and the user turn carries
  ``"Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>"`` (the processor's chat template),
  the patient context when there is one, and a question naming both classes and
  asking for ``1`` or ``0``;
* greedy generation; **only the new tokens** are decoded; :func:`parse_answer` maps the
  answer to 1/0, and an answer it cannot map is *unparseable* and counted as wrong;
* AUROC needs a score: ``P = softmax(logit["1"], logit["0"])[0]`` from the raw logits of
  the first generated position (``output_logits=True``, i.e. before any logits
  processor). How the RespiraMFM paper scored it is unverified (docs/paper.md §5).

Weights are not bundled: the user passes a local directory or hub id (``options["model"]``);
nothing is downloaded unless the caller's environment allows it. There is no training,
so no data but the test records' audio is read — selection on test cannot happen.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from respiramfm.audio import FrontendConfig
from respiramfm.data.records import read_manifest, resolve_audio_path
from respiramfm.data.templates import class_names
from respiramfm.errors import ConfigError, RespiraMFMError
from respiramfm.models.processing import InputProcessor, record_context
from respiramfm.utils.io import atomic_write_json, atomic_write_text, csv_cell, csv_row

SAMPLE_RATE = 16000
MAX_SECONDS = 30.0
AUDIO_TURN = "Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
_POS_WORDS = ("yes", "positive", "present")
_NEG_WORDS = ("no", "negative", "absent", "healthy", "not present")


def question(task, context: str = "") -> str:
    """The text part of the user turn: context (if any), the two classes, and the 0/1 instruction."""
    neg, pos = class_names(task)
    phrase = getattr(task, "disease_phrase", "") or getattr(task, "disease", "") or pos
    parts = []
    if context and context.strip():
        parts.append(f"Patient information: {context.strip()}")
    parts.append(f"Classes: 1 = {pos}, 0 = {neg}. Does this recording indicate {phrase}? "
                 "Answer with a single digit, 1 or 0.")
    return " ".join(parts)


def parse_answer(text: str) -> int | None:
    """1 / 0 from a generated answer, or None when it is empty, contradictory or off-topic."""
    t = text.strip().lower()
    digits = set(re.findall(r"(?<![\d.])([01])(?!\d|\.\d)", t))
    if len(digits) == 1:
        return int(digits.pop())
    if digits:
        return None
    neg = any(re.search(rf"\b{re.escape(w)}\b", t) for w in _NEG_WORDS)
    pos = any(re.search(rf"\b{re.escape(w)}\b", t) for w in _POS_WORDS) and not re.search(r"\bnot present\b", t)
    if pos != neg:
        return int(pos)
    return None


@dataclass
class Answer:
    text: str              # decoded new tokens only
    label: int | None      # parsed class; None = unparseable
    prob: float            # P("1") vs P("0") at the first generated position


class Qwen2AudioScorer:
    """A Qwen2-Audio model + processor that answers 0/1 questions about one recording at a time."""

    def __init__(self, model, processor, max_new_tokens: int = 8):
        self.model = model.eval()
        self.processor = processor
        self.max_new_tokens = int(max_new_tokens)
        tok = processor.tokenizer
        self.answer_ids = {}
        for digit in ("1", "0"):
            ids = tok.encode(digit, add_special_tokens=False)
            if len(ids) != 1:
                raise ConfigError(f"the tokenizer splits {digit!r} into {len(ids)} tokens; cannot score it")
            self.answer_ids[digit] = ids[0]

    @classmethod
    def from_pretrained(cls, name_or_path: str, dtype: str = "float32", device: str = "cpu", revision=None,
                        max_new_tokens: int = 8) -> "Qwen2AudioScorer":
        from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration  # lazy: a 7B model's classes

        if not name_or_path:
            raise ConfigError("Qwen2-Audio needs weights: set options.model to a local directory or hub id "
                              "(e.g. Qwen/Qwen2-Audio-7B-Instruct, downloaded beforehand)")
        try:
            processor = AutoProcessor.from_pretrained(name_or_path, revision=revision)
            model = Qwen2AudioForConditionalGeneration.from_pretrained(name_or_path, revision=revision,
                                                                       dtype=getattr(torch, dtype))
        except OSError as exc:
            raise ConfigError(f"cannot load Qwen2-Audio: {exc}".splitlines()[0], path=name_or_path) from exc
        return cls(model.to(device), processor, max_new_tokens)

    def prompt(self, text: str) -> str:
        conversation = [{"role": "user", "content": [{"type": "audio", "audio_url": "recording"},
                                                     {"type": "text", "text": text}]}]
        rendered = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        if AUDIO_TURN.strip() not in rendered:
            raise ConfigError("the processor's chat template does not produce the "
                              "'Audio 1: <|audio_bos|><|AUDIO|><|audio_eos|>' turn")
        return rendered

    def answer(self, waveform: np.ndarray, text: str) -> Answer:
        """Generate for one 16 kHz mono waveform and one question."""
        wave = np.asarray(waveform, dtype=np.float32)[: int(MAX_SECONDS * SAMPLE_RATE)]
        inputs = self.processor(text=[self.prompt(text)], audio=[wave], sampling_rate=SAMPLE_RATE,
                                return_tensors="pt", padding=True)
        inputs = inputs.to(self.model.device)
        n_in = inputs["input_ids"].shape[1]
        with torch.no_grad():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False,
                                      output_logits=True, return_dict_in_generate=True)
        new = out.sequences[0, n_in:]
        decoded = self.processor.tokenizer.decode(new, skip_special_tokens=True)
        first = out.logits[0][0].float()
        pair = torch.stack([first[self.answer_ids["1"]], first[self.answer_ids["0"]]])
        prob = float(torch.softmax(pair, dim=0)[0])
        return Answer(decoded, parse_answer(decoded), prob)


def fit_predict(data, seed: int, work_dir: Path, options: dict) -> dict:
    """Protocol system: score every test record with audio; write answers (and unparseable counts).

    Options: ``model`` (required: local dir or hub id), ``dtype``, ``device``, ``max_new_tokens``,
    ``revision``. ``seed`` is unused (greedy decoding is deterministic).
    """
    scorer = options.get("scorer") or Qwen2AudioScorer.from_pretrained(
        str(options.get("model", "")), str(options.get("dtype", "float32")), str(options.get("device", "cpu")),
        options.get("revision"), int(options.get("max_new_tokens", 8)))
    manifest_dir = {r.record_id: Path(m).parent for m in data.manifests for r in read_manifest(m)}
    processor = InputProcessor(FrontendConfig(sr=SAMPLE_RATE))
    out: dict[str, dict[str, float]] = {}
    rows, errors, stats = [], [], {}
    for name, task in data.tasks.items():
        st = stats.setdefault(name, {"n": 0, "unparseable": 0, "correct": 0, "errors": 0})
        for rec, label in task.select(data.split("test")):
            path = resolve_audio_path(rec, manifest_dir.get(rec.record_id, Path(".")))
            if path is None:  # no recording: this system cannot score the record (reported as missing)
                continue
            try:
                wave = processor.waveform(path).wave
            except RespiraMFMError as exc:
                errors.append(f"{csv_cell(rec.record_id)}\t{exc}")
                st["errors"] += 1
                continue
            ans = scorer.answer(wave, question(task, record_context(rec)))
            out.setdefault(name, {})[rec.record_id] = ans.prob
            st["n"] += 1
            st["unparseable"] += ans.label is None
            st["correct"] += ans.label == label  # unparseable counts as wrong
            rows.append([name, rec.record_id, label, ans.text, "" if ans.label is None else ans.label, ans.prob])
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    csv.writer(buf).writerows([["task", "record_id", "label", "answer", "parsed", "prob"], *map(csv_row, rows)])
    atomic_write_text(work_dir / "answers.csv", buf.getvalue())
    atomic_write_text(work_dir / "errors.tsv", "".join(e + "\n" for e in errors))
    for st in stats.values():
        st["accuracy_unparseable_wrong"] = st["correct"] / st["n"] if st["n"] else None
    atomic_write_json(work_dir / "summary.json", {"scoring": "softmax over next-token logits of '1' vs '0'",
                                                  "tasks": stats})
    return out


__all__ = ["AUDIO_TURN", "Answer", "Qwen2AudioScorer", "fit_predict", "parse_answer", "question"]
