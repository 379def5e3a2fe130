"""The ``real-lung`` preset: train on ICBHI by patient-grouped k-fold CV, test zero-shot on KAUH.

    respiramfm demo --preset real-lung --data-root data [--quick]

``data_root`` holds ``icbhi/`` (the official layout or the cycle-segment copy) and ``kauh/``.
The recipe is the pipeline's (records -> encoder -> embeddings -> stage 1 -> stage 2 -> every
protocol baseline), run once per fold:

* ICBHI is the supervised dataset, with two tasks: T4 (COPD vs healthy, the paper's) and
  T4R (COPD vs every other ICBHI diagnosis, a second view with its own prompt, ours). Its
  patients are dealt to ``folds`` folds (stratified by diagnosis, :mod:`.folds`); fold k's
  patients are its test split and a validation split is carved from the others by patient.
* KAUH is zero-shot data: all of it is test data in every fold (T7 COPD vs normal, T8
  asthma vs normal); it never reaches the encoder pretraining, stage 1 or stage 2.
* Each fold is one `respiramfm evaluate` run (:func:`respiramfm.evaluate.protocol.evaluate`)
  under ``OUT/folds/foldK/evaluate``, resumable unit by unit; the systems include ``meta_only``
  (device, location, age, sex: :mod:`respiramfm.evaluate.baselines_meta`).
* The aggregate over folds (:mod:`.real_lung_report`) pools ICBHI's out-of-fold predictions,
  scores KAUH per fold model (mean over folds) and by the fold ensemble's mean probability,
  at cycle, recording and patient level, with patient-level CIs, paired differences to
  RespiraMFM, and the same scores restricted to one recording device / filter.

Stage 2 and every LLM baseline use the simulated demo's settings (:func:`presets.simulated`) with
three changes of ours for two shared CPU cores: one seed, every LLM training stops after
``MAX_STEPS`` optimiser steps, and precision ``auto`` (bf16 only where the CPU runs it natively).
Stage 1 is restricted to ICBHI's training patients of the fold. ``--set cv.only_folds=[..]`` runs
some folds (several processes may share one output folder on disjoint folds; the run that finds
every fold done writes the aggregate); ``cv.probe_only`` stops each fold after its encoder probe. With ``encoder.pretrain`` the
tiny HTS-AT is pretrained OPERA-style per fold on that fold's ICBHI train+val audio (never test
patients, never KAUH), and embeds that fold's records; an encoder probe (logistic regression
on frozen embeddings, train -> validation) records how each encoder does on ICBHI validation.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from respiramfm.config import save_config
from respiramfm.data.records import read_manifest, write_manifest
from respiramfm.data.task_defs import COPD, DESCRIPTIONS, Task
from respiramfm.data.tasks import dump_tasks_yaml, register
from respiramfm.encoders.store import embed_manifest
from respiramfm.errors import DataError
from respiramfm.evaluate.protocol import evaluate
from respiramfm.fusion.train import finetune
from respiramfm.pipeline import presets
from respiramfm.pipeline.config import PipelineConfig
from respiramfm.pipeline.folds import CrossValidation, assign_folds, fold_counts, fold_records
from respiramfm.pipeline.real import prepare_dataset
from respiramfm.pipeline.real_lung_report import aggregate, encoder_probe
from respiramfm.pipeline.recipe import (align_config, align_stage, audio_encoder, embed_text_stage, evaluate_config,
                                        finetune_config)
from respiramfm.pipeline.stages import Inputs, PipelineCallback, Stages
from respiramfm.pipeline.threads import apply_threads
from respiramfm.utils.io import atomic_write_json

SUPERVISED, ZERO_SHOT = "icbhi", "kauh"
TRAINED = ["T4", "T4R"]
EVALUATED = ["T4", "T4R", "T7", "T8"]
SYSTEMS = [*presets.SYSTEMS, "meta_only"]
QUICK_SYSTEMS = ["respiramfm", "bts_frozen", "meta_only"]
STAGE1_USERS = {"respiramfm", "missing_text", "audio_only", "text_only"}   # read the fold's projector
STAGE2_USERS = {"respiramfm", "missing_text"}                                # reuse the fold's stage-2 run
TEXT_USERS = {*STAGE1_USERS, "no_alignment", "no_alignment_linear", "respllm", "bts_frozen"}
MAX_STEPS = {False: 80, True: 30}      # per LLM training (ours: two shared CPU cores)
ALIGN_EPOCHS = {False: 60, True: 20}
REST = ("urti", "lrti", "asthma", "pneumonia", "bronchiectasis", "bronchiolitis")
T4R = Task("T4R", "icbhi", **COPD, positive=("copd",), negative=("healthy", *REST), audio_type="lung",
           role="supervised", description=DESCRIPTIONS["icbhi"],
           extra={"negative_class": "other respiratory condition or healthy", "subject": "person",
                  "note": "ours: COPD vs every other ICBHI diagnosis (not a paper task)"})


@dataclass(frozen=True)
class FoldPaths:
    """Where one fold keeps its stages (the attribute names the recipe's stage helpers read)."""

    root: Path
    audio: Path
    text: Path

    encoder = property(lambda self: self.root / "encoder")
    align = property(lambda self: self.root / "align")
    evaluate = property(lambda self: self.root / "evaluate")

    def finetune(self, seed: int | str = "{seed}") -> Path:
        return self.root / "finetune" / f"seed{seed}"


class RunPaths:
    """``OUT/``: pipeline.yaml, data/ (manifests, tasks.yaml, folds.json), audio_emb/, text_emb/, folds/foldK/,
    results.{json,md}, summary.json."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.data = self.root / "data"
        self.tasks = self.data / "tasks.yaml"
        self.folds = self.data / "folds.json"
        self.audio, self.text = self.root / "audio_emb", self.root / "text_emb"

    def manifest(self, key: str) -> Path:
        return self.data / f"{key}.csv"

    def fold(self, k: int, own_encoder: bool) -> FoldPaths:
        root = self.root / "folds" / f"fold{k}"
        return FoldPaths(root, root / "audio_emb" if own_encoder else self.audio, self.text)


def real_lung(data_root: str = "data", quick: bool = False, seed: int = 0, backbone: str | None = None,
              llm_layers: int | None = None, opera_checkpoint: str | None = None, pretrain_encoder: bool = False,
              folds: int = 5, out: str = "runs/real-lung", settings: str = "cpu") -> PipelineConfig:
    """The preset: the simulated demo's stage settings (stage 2 and every baseline), ICBHI k-fold, KAUH zero-shot.

    Sized for two CPU cores (ours): one seed; stage 1 for ``ALIGN_EPOCHS``; every LLM training of a
    fold stops after ``MAX_STEPS`` optimiser steps (the shared budget, validated at its end).
    """
    demo = presets.simulated(quick=quick, backbone=backbone, llm_layers=llm_layers, efficiency="",
                             pretrain_encoder=pretrain_encoder, opera_checkpoint=opera_checkpoint, settings=settings)
    ev = copy.deepcopy(demo.evaluate)
    ev.seeds, ev.data_efficiency = [0], ""
    ev.systems = list(QUICK_SYSTEMS if quick else SYSTEMS)
    ev.systems_options = {k: v for k, v in ev.systems_options.items() if k in ev.systems}
    ev.n_boot = 300 if quick else 1000
    ft = copy.deepcopy(demo.finetune)
    ft.max_steps = ft.eval_every = MAX_STEPS[bool(quick)]
    ft.precision = "auto"  # bf16 only where this CPU runs it natively (without AVX512-BF16/AMX it is ~50x slower)
    align = copy.deepcopy(demo.align)
    align.datasets, align.figure, align.epochs = [SUPERVISED], False, ALIGN_EPOCHS[bool(quick)]
    return PipelineConfig(preset="real-lung", out=str(out), data_root=str(data_root), seed=seed, quick=quick,
                          encoder=demo.encoder, pretrain=demo.pretrain, align=align, finetune=ft, evaluate=ev,
                          cv=CrossValidation(folds=int(folds))).validate()


def prepare_lung(cfg: PipelineConfig, paths: RunPaths, log: Callable = print) -> tuple[list, list]:
    """``prepare icbhi`` and ``prepare kauh`` (all test) into ``OUT/data``; (icbhi records, kauh records)."""
    root = Path(cfg.data_root)
    for key in (SUPERVISED, ZERO_SHOT):
        if not (root / key).is_dir():
            raise DataError(f"the real-lung preset needs {key}/ under the data root", path=root)
    paths.data.mkdir(parents=True, exist_ok=True)
    prepare_dataset(SUPERVISED, root / SUPERVISED, paths.manifest(SUPERVISED), cfg.seed, whole_test=False)
    prepare_dataset(ZERO_SHOT, root / ZERO_SHOT, paths.manifest(ZERO_SHOT), cfg.seed, whole_test=True)
    icbhi = [r for r in read_manifest(paths.manifest(SUPERVISED)) if r.has_audio]
    kauh = [r for r in read_manifest(paths.manifest(ZERO_SHOT)) if r.has_audio]
    if not any(T4R.label(r) == 1 for r in icbhi) or not any(T4R.label(r) == 0 for r in icbhi):
        raise DataError("ICBHI needs COPD and non-COPD patients with audio for the real-lung preset",
                        path=root / SUPERVISED)
    register(T4R, overwrite=True)
    dump_tasks_yaml([T4R], paths.tasks)
    log(f"   icbhi: {len(icbhi)} records of {len({r.patient_id for r in icbhi})} patients; "
        f"kauh: {len(kauh)} records of {len({r.patient_id for r in kauh})} patients (zero-shot: all test)")
    return icbhi, kauh


def write_folds(cfg: PipelineConfig, paths: RunPaths, icbhi: list, kauh: list) -> dict:
    """``OUT/data/foldK.csv`` for every fold and ``OUT/data/folds.json`` (patient -> fold, counts)."""
    folds = assign_folds(icbhi, cfg.cv.folds, cfg.seed)
    counts = {}
    for k in range(cfg.cv.folds):
        recs = fold_records(icbhi, kauh, folds, k, cfg.cv.val_fraction, cfg.seed)
        write_manifest(recs, paths.manifest(f"fold{k}"))
        counts[k] = fold_counts(recs)
    info = {"k": cfg.cv.folds, "seed": cfg.seed, "val_fraction": cfg.cv.val_fraction, "patients": folds,
            "counts": counts}
    atomic_write_json(paths.folds, info)
    return info


def _inputs(paths: RunPaths, k: int) -> Inputs:
    return Inputs(paths.manifest(f"fold{k}"), [str(paths.tasks)], list(TRAINED), list(EVALUATED))


def run_fold(cfg: PipelineConfig, paths: RunPaths, k: int, stage: Stages, threads: int) -> dict:
    """Encoder (when pretrained per fold), stage 1, stage 2 and the protocol's evaluation of fold ``k``."""
    inputs, own = _inputs(paths, k), bool(cfg.encoder.pretrain)
    fold = paths.fold(k, own)
    name, ckpt = cfg.encoder.name, cfg.encoder.checkpoint
    if own:
        name, ckpt = stage(f"fold{k}/pretrain-audio", audio_encoder, cfg, fold, inputs, threads)
        stage(f"fold{k}/embed", embed_manifest, inputs.manifest, fold.audio, name, checkpoint=ckpt or None,
              batch_size=cfg.encoder.batch_size, device=cfg.device, progress=False)
    if cfg.cv.probe:
        atomic_write_json(fold.root / "probe.json", encoder_probe(inputs.manifest, fold.audio, TRAINED,
                                                                  (cfg.cv.restrict or {}).get(SUPERVISED)))
    if cfg.cv.probe_only:
        return {}
    systems = set(cfg.evaluate.systems)
    if systems & STAGE1_USERS:
        stage(f"fold{k}/align", align_stage, cfg, fold, inputs.manifest, threads, inputs.task_files, inputs.evaluated)
    fcfg = finetune_config(cfg, fold, inputs, threads)
    if systems & STAGE2_USERS:
        stage(f"fold{k}/finetune", finetune, fcfg, callbacks=stage.training_callbacks("finetune"))
    acfg = align_config(cfg, fold, inputs.manifest, threads, inputs.task_files, inputs.evaluated)
    ecfg = evaluate_config(cfg, fold, inputs, fcfg, ckpt, acfg)
    ecfg.report = False
    return stage(f"fold{k}/evaluate", evaluate, ecfg, log=stage.log)


def run_real_lung(cfg: PipelineConfig, callbacks: list[PipelineCallback] = (), log: Callable = print) -> dict:
    """Run (or finish) every fold of ``cfg`` under ``cfg.out``, then the aggregate; returns its summary."""
    cfg.validate()
    paths = RunPaths(cfg.out)
    paths.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, paths.root / "pipeline.yaml")  # `demo --config OUT/pipeline.yaml` resumes
    previous = torch.get_num_threads()
    threads = apply_threads(cfg.threads)
    stage = Stages(callbacks, log)
    try:
        icbhi, kauh = stage("prepare", prepare_lung, cfg, paths, log)
        info = stage("folds", write_folds, cfg, paths, icbhi, kauh)
        if not cfg.encoder.pretrain:
            stage("embed", embed_manifest, paths.manifest("fold0"), paths.audio, cfg.encoder.name,
                  checkpoint=cfg.encoder.checkpoint or None, batch_size=cfg.encoder.batch_size, device=cfg.device,
                  progress=False)
        if not cfg.cv.probe_only and set(cfg.evaluate.systems) & TEXT_USERS:
            stage("embed-text", embed_text_stage, cfg, paths, paths.manifest("fold0"))
        todo = [int(k) for k in cfg.cv.only_folds] or list(range(cfg.cv.folds))
        for k in todo:
            run_fold(cfg, paths, k, stage, threads)
    finally:
        torch.set_num_threads(previous)
    if cfg.cv.probe_only:
        probe = {k: json.loads(f.read_text()) for k in range(cfg.cv.folds)
                 if (f := paths.root / "folds" / f"fold{k}" / "probe.json").is_file()}
        atomic_write_json(paths.root / "probe.json", probe)
        log(f"\n== encoder probe (validation AUROC per fold): {probe}")
        return {"probe": probe, "seconds": stage.timings}
    done = [k for k in range(cfg.cv.folds) if (paths.fold(k, False).evaluate / "results.json").is_file()]
    facts = {"data_root": str(cfg.data_root), "folds": cfg.cv.folds, "folds_done": done, "threads": threads,
             "encoder": "tiny HTS-AT pretrained per fold" if cfg.encoder.pretrain else cfg.encoder.name,
             "llm": cfg.finetune.model.backbone, "llm_layers": cfg.finetune.model.num_layers or "all",
             "systems": list(cfg.evaluate.systems), "seeds": list(cfg.evaluate.seeds), "seconds": stage.timings,
             "total_seconds": round(sum(stage.timings.values()), 1), "counts": info["counts"]}
    atomic_write_json(paths.root / "summary.json", facts)
    if len(done) < cfg.cv.folds:
        log(f"\n== real-lung: folds {done} of {cfg.cv.folds} done; run again (or with only_folds) to finish")
        return facts
    return stage("aggregate", aggregate, cfg, paths, facts, EVALUATED, log)


__all__ = ["EVALUATED", "FoldPaths", "RunPaths", "SYSTEMS", "T4R", "TRAINED", "real_lung",
           "run_fold", "run_real_lung", "write_folds"]


presets.register(presets.PipelinePreset(
    "real-lung", lambda o: real_lung(o.data_root, o.quick, o.seed, o.backbone, o.llm_layers, o.opera_checkpoint,
                                     o.pretrain_encoder, out=o.out, settings=o.settings),
    settings="cpu", needs_data_root=True,
    help="ICBHI by patient-grouped 5-fold CV (T4, T4R) and KAUH zero-shot (T7, T8), every baseline, meta_only"))
