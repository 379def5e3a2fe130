"""``respiramfm predict``: the probability of a condition for one recording, or for a manifest.

One saved model directory is all a user needs: its ``config.json`` names the
audio encoder (and checkpoint) and the front-end settings the model was trained
with, so a raw audio file goes decode -> OPERA front end -> that encoder ->
the model's frozen projector -> LLM, exactly as in training.

Inputs go through the one input processor (:mod:`respiramfm.models.processing`):
the audio file is decoded and featurised there, and context comes from either
free-text symptoms (used as written) or a metadata JSON object, worded by the
same context rule the training data used. A missing modality is not
an error: the sample is scored with what it has, and the output says which
modalities were used and warns about the rest.

Batch mode writes the predictions CSV atomically at the end; while it runs,
finished rows are appended to a hidden progress file, so a killed job resumes
where it stopped. Records that fail (undecodable audio, bad embeddings) are
written to an errors file with their cause; every record ends up in exactly one
of the two files.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from respiramfm.data.records import read_manifest, resolve_audio_path
from respiramfm.encoders.registry import get_encoder
from respiramfm.errors import CheckpointError, ConfigError, RespiraMFMError
from respiramfm.fusion import model_facts
from respiramfm.fusion.predict_io import CSV_FIELDS, ProgressLog, manifest_metrics, write_metrics, write_outputs
from respiramfm.models.fusion import RespiraMFM
from respiramfm.models.processing import AudioInput, InputProcessor, parse_metadata, record_context
from respiramfm.models.sequence import FusionItem
from respiramfm.utils.io import sha256_file
from respiramfm.utils.progress import add_run_flags, apply_threads_flag
from respiramfm.utils.progress import progress as progress_bar


class Predictor:
    """A loaded model plus the audio path it was trained with (encoder built on first use)."""

    def __init__(self, model, model_dir: str | os.PathLike | None = None, device: str = "cpu",
                 encoder_checkpoint: str | None = None, encoder: Any = None):
        self.model = model.eval()
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.device = device
        self.encoder_checkpoint = encoder_checkpoint
        self._encoder = encoder
        self.model_id = self._model_id()
        model_facts.check_compat(self.model, self.model_dir, used_with="this model")
        fe = self.model.cfg.encoder
        self.frontend = fe.frontend_config() if fe.frontend else get_encoder(fe.name).frontend
        self.processor = InputProcessor(self.frontend, embed=self.embed_specs)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str = "cpu",
                        encoder_checkpoint: str | None = None, allow_download: bool = False) -> "Predictor":
        model = RespiraMFM.from_pretrained(directory, device=device, allow_download=allow_download)
        return cls(model, directory, device, encoder_checkpoint)

    def _model_id(self) -> str:
        if self.model_dir is not None and (self.model_dir / "config.json").is_file():
            return f"{self.model_dir.name}@{sha256_file(self.model_dir / 'config.json')[:12]}"
        return f"unsaved:{self.model.cfg.backbone}"

    # ------------------------------------------------------------------ audio
    def _checkpoint_path(self, spec) -> str | None:
        if not spec.needs_checkpoint:
            return None
        given = self.encoder_checkpoint or self.model.cfg.encoder.checkpoint
        if not given:
            raise ConfigError(f"the model's audio encoder {spec.name!r} needs a checkpoint and config.json names "
                              "none; pass --encoder-checkpoint")
        candidates = [Path(given)]
        if self.model_dir is not None and not Path(given).is_absolute():
            candidates.append(self.model_dir / given)
        for c in candidates:
            if c.is_file():
                return str(c)
        raise ConfigError(f"audio encoder checkpoint {given!r} not found; pass --encoder-checkpoint")

    def encoder(self):
        """The recorded audio encoder, built once; its weights must match the recorded hash."""
        if self._encoder is None:
            info = self.model.cfg.encoder
            spec = get_encoder(info.name)
            enc = spec.build(self._checkpoint_path(spec), self.device)
            if info.weights_hash and enc.weights_hash != info.weights_hash:
                raise CheckpointError(f"audio encoder weights {enc.weights_hash[:12]} differ from the ones the "
                                      f"model was trained with ({info.weights_hash[:12]})")
            if int(enc.out_dim) != self.model.in_dim:
                raise CheckpointError(f"audio encoder gives {enc.out_dim}-d embeddings, the projector expects "
                                      f"{self.model.in_dim}-d")
            self._encoder = enc
        return self._encoder

    def embed_specs(self, specs: list[np.ndarray]) -> np.ndarray:
        enc = self.encoder()
        if self.model.cfg.n_audio_tokens > 1 or self.model.cfg.encoder.tokens:
            return enc.encode_tokens(specs)
        return enc.encode(specs)

    # ------------------------------------------------------------------ single prediction
    def _warnings(self, audio_given: bool, context_given: bool, used: tuple[str, ...]) -> list[str]:
        mode = self.model.cfg.mode
        out = []
        if mode == "multimodal":
            if not audio_given:
                out.append("no audio given: scored from the context alone (text-only prompt); the model was "
                           "trained with audio and context")
            if not context_given:
                out.append("no context given: scored from the audio alone; the model was trained with audio "
                           "and context")
        if mode == "audio_only" and context_given:
            out.append("context ignored: the model is audio-only")
        if mode == "text_only" and audio_given:
            out.append("audio ignored: the model is text-only")
        return out

    def predict(self, audio_path: str | os.PathLike | None = None, symptoms: str | None = None,
                metadata: dict | str | None = None, task: str | None = None, attribution: bool = False,
                audio: AudioInput | None = None) -> dict:
        """Probability that ``task``'s condition is present, with what was used and any warnings.

        The recording is a file (``audio_path``) or in-memory content (``audio``: bytes or a
        decoded :class:`~respiramfm.models.processing.Waveform`), not both.
        """
        if audio_path is not None and audio is not None:
            raise ConfigError("give the recording as a path or as content, not both")
        source = audio if audio is not None else audio_path
        item = self.request_item(source, symptoms, metadata, task)
        used = self.model.resolve(item).modalities
        prob = float(self.model.predict_proba([item])[0])
        out = self.describe(item, prob, source is not None, item.context is not None, used)
        if attribution:
            out["attention"] = self.model.attention_attribution(item)
        return out

    def describe(self, item: FusionItem, prob: float, audio_given: bool, context_given: bool,
                 used: tuple[str, ...]) -> dict:
        """The answer for one scored item (shared by :meth:`predict` and the server's batches)."""
        task_obj = item.task
        return {"probability": prob, "task": task_obj.name, "disease": task_obj.disease,
                **model_facts.decision(self.model, task_obj, prob),
                "modalities_used": list(used), "model": self.model_id,
                "warnings": self._warnings(audio_given, context_given, used)
                + model_facts.warnings_for(self.model, task_obj),
                "trained_on": model_facts.trained_on(self.model)}

    def request_item(self, audio: AudioInput | None = None, symptoms: str | None = None,
                     metadata: dict | str | None = None, task: str | None = None, embed: bool = True) -> FusionItem:
        """The model input of one request (audio embedded unless ``embed`` is False: the caller then fills it)."""
        if not task:
            raise ConfigError("a task is required (e.g. --task T4)")
        task_obj = self.model.get_task(task)
        meta = parse_metadata(metadata) if isinstance(metadata, str) else metadata
        return self.processor.request_item(task_obj, audio, symptoms, meta, embed=embed,
                                           use_audio=self.model.cfg.mode != "text_only")

    # ------------------------------------------------------------------ batch prediction
    def predict_manifest(self, manifest: str | os.PathLike, task: str, out: str | os.PathLike,
                         errors: str | os.PathLike | None = None, batch_size: int = 16,
                         resume: bool = True, progress: bool = True, n_boot: int = 1000) -> dict:
        """Predict every record of a manifest; returns a summary (counts and output paths).

        ``progress``: a bar on a terminal, else plain lines on stderr (:mod:`respiramfm.utils.progress`).
        Each row carries the decision at the model's validation threshold; when rows carry labels the
        summary adds ``metrics`` (AUROC with a patient-level CI, operating points, counts at the
        threshold; ``n_boot`` resamples), also written to ``OUT.metrics.json``."""
        task_obj = self.model.get_task(task)
        records = read_manifest(manifest)
        out = Path(out)
        errors = Path(errors) if errors else out.with_name(out.stem + ".errors.tsv")
        log = ProgressLog(out, {"model": self.model_id, "task": task_obj.name, "manifest": str(manifest)},
                          resume=resume)
        todo = [r for r in records if not log.done(r.record_id)]
        manifest_dir = Path(manifest).parent
        use_audio = self.model.cfg.mode != "text_only"
        bar = progress_bar(len(todo), f"predict {task_obj.name}", "record", enabled=progress)
        for start in range(0, len(todo), max(1, batch_size)):
            chunk = todo[start:start + max(1, batch_size)]
            paths = {r.record_id: resolve_audio_path(r, manifest_dir) for r in chunk}
            with_audio = [r for r in chunk if paths[r.record_id] is not None and use_audio]
            specs = self.processor.spectrograms([paths[r.record_id] for r in with_audio]) if with_audio else []
            spec_of = dict(zip((r.record_id for r in with_audio), specs))
            good = [(rid, s) for rid, s in spec_of.items() if not isinstance(s, Exception)]
            embs = dict(zip((rid for rid, _ in good), self.embed_specs([s for _, s in good]))) if good else {}
            items, rows = [], []
            for r in chunk:
                bad = spec_of.get(r.record_id)
                if isinstance(bad, Exception):
                    log.error(r.record_id, str(paths[r.record_id]), getattr(bad, "cause", str(bad)))
                    continue
                context = record_context(r)
                item = FusionItem(task=task_obj, audio=embs.get(r.record_id), context=context,
                                  audio_type=r.audio_type, key=r.record_id)
                try:
                    used = self.model.resolve(item).modalities
                except RespiraMFMError as exc:
                    log.error(r.record_id, str(paths[r.record_id] or ""), exc.cause)
                    continue
                label = task_obj.label(r)
                warn = self._warnings(paths[r.record_id] is not None, bool(context.strip()), used)
                items.append(item)
                rows.append({"record_id": r.record_id, "patient_id": r.patient_id, "dataset": r.dataset,
                             "split": r.split, "task": task_obj.name, "label": "" if label is None else label,
                             "modalities_used": "+".join(used), "warnings": " | ".join(warn)})
            probs = self.model.predict_proba(items, batch_size=batch_size) if items else []
            for row, p in zip(rows, probs):
                row["probability"] = f"{float(p):.8f}"
                d = model_facts.decision(self.model, task_obj, float(p))  # as predict() decides
                row["decision"] = "" if d["decision"] is None else d["decision"]
                row["threshold"] = "" if d["threshold"] is None else d["threshold"]
                log.row(row)
            bar.update(len(chunk))
        bar.close()
        rows = list(log.rows.values())
        n_rows, n_err = write_outputs(log, out, errors)
        rule = model_facts.decision(self.model, task_obj, 0.0)
        result = {"predicted": n_rows, "errors": n_err, "records": len(records), "out": str(out),
                  "errors_file": str(errors), "model": self.model_id, "task": task_obj.name,
                  "threshold": rule["threshold"], "threshold_rule": rule["threshold_rule"],
                  "warnings": model_facts.warnings_for(self.model, task_obj),
                  "trained_on": model_facts.trained_on(self.model)}
        metrics = manifest_metrics(rows, result["threshold"], n_boot)
        if metrics is not None:  # labels present: AUROC with a patient-level CI and the operating points
            result["metrics"] = metrics
            result["metrics_file"] = str(write_metrics(out, metrics))
        return result


# ---------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model directory written by `respiramfm finetune`")
    parser.add_argument("--task", required=True, help="task name, e.g. T4 (see the model's config.json)")
    parser.add_argument("--audio", help="one recording (wav, mp3, ogg, flac, webm...)")
    text = parser.add_mutually_exclusive_group()
    text.add_argument("--symptoms", help="free-text symptoms, used as the patient context as written")
    text.add_argument("--metadata", help="patient metadata as a JSON object (or a path to a .json file); "
                                         "keys: age, sex, symptoms, medical_history, smoker, location, audio_type")
    parser.add_argument("--attribution", action="store_true", help="add the attention over the context tokens")
    parser.add_argument("--manifest", help="predict every record of this manifest CSV instead of one recording")
    parser.add_argument("--out", help="predictions CSV (batch mode)")
    parser.add_argument("--errors", help="errors TSV (batch mode; default: next to --out)")
    parser.add_argument("--no-resume", action="store_true", help="batch mode: ignore earlier progress")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--encoder-checkpoint", help="audio encoder checkpoint, if not where config.json says")
    parser.add_argument("--allow-download", action="store_true",
                        help="let a hub-id backbone named in config.json be downloaded (default: local files only)")
    add_run_flags(parser, "batch mode: no progress bar (plain progress lines on stderr instead)")


def run(args: argparse.Namespace) -> int:
    if args.manifest:
        if not args.out:
            raise ConfigError("--manifest needs --out")
        if args.audio or args.symptoms or args.metadata or args.attribution:
            raise ConfigError("--manifest cannot be combined with --audio/--symptoms/--metadata/--attribution")
    elif not (args.audio or args.symptoms or args.metadata):
        raise ConfigError("give --audio and/or --symptoms/--metadata (or --manifest with --out)")
    apply_threads_flag(args.threads)
    predictor = Predictor.from_pretrained(args.model, device=args.device, encoder_checkpoint=args.encoder_checkpoint,
                                          allow_download=args.allow_download)
    if args.manifest:
        result = predictor.predict_manifest(args.manifest, args.task, args.out, args.errors,
                                            batch_size=args.batch_size, resume=not args.no_resume,
                                            progress=not args.no_progress)
    else:
        metadata = parse_metadata(args.metadata) if args.metadata else None
        result = predictor.predict(audio_path=args.audio, symptoms=args.symptoms, metadata=metadata,
                                   task=args.task, attribution=args.attribution)
    print(json.dumps(result, sort_keys=True))
    return 0


__all__ = ["CSV_FIELDS", "Predictor", "add_arguments", "run"]
