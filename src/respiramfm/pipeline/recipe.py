"""The pipeline recipe: prepare -> [pretrain-audio] -> embed -> embed-text -> align -> finetune -> evaluate.

:func:`run_pipeline` calls each stage's function with its typed config (no command lines);
the simulated demo and the real-data run are two presets of the same recipe
(:mod:`respiramfm.pipeline.presets`). Every stage resumes from what an earlier, possibly
interrupted, run left under ``OUT/``, so running the same config again finishes the run
and reproduces the same report. Callbacks (:class:`PipelineCallback`) see each stage start
and end; the tests use one to interrupt a run at a chosen point.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Callable, Sequence

import torch

from respiramfm.align.train import train_align
from respiramfm.config import save_config
from respiramfm.data.simulate import SimConfig, simulate_cohort
from respiramfm.encoders.pretrain import pretrain
from respiramfm.encoders.store import EmbeddingStore, embed_manifest
from respiramfm.evaluate.budget import pipeline_budget, quick_finetune
from respiramfm.evaluate.data import supervised_tasks
from respiramfm.evaluate.protocol import evaluate
from respiramfm.evaluate.registry import available
from respiramfm.fusion.train import finetune
from respiramfm.llm.text_store import embed_manifest as embed_texts
from respiramfm.models.fusion import load_configured_backbone
from respiramfm.pipeline.config import PipelineConfig
from respiramfm.pipeline.layout import PipelineLayout
from respiramfm.pipeline.real import check_real, prepare_real
from respiramfm.pipeline.stages import Inputs, PipelineCallback, Stages
from respiramfm.pipeline.threads import apply_threads
from respiramfm.utils.io import atomic_write_bytes, atomic_write_json


def prepare_simulated(cfg: PipelineConfig, lay: PipelineLayout) -> Inputs:
    c = cfg.cohort
    sim = SimConfig(seed=cfg.seed, quick=bool(c.quick), n_patients=c.n_patients,
                    recordings_per_patient=c.recordings_per_patient,
                    datasets=tuple(c.datasets) if c.datasets else None, out_dir=str(lay.data))
    manifest = simulate_cohort(lay.data, sim)
    return Inputs(manifest, [str(lay.tasks)], supervised_tasks([str(lay.tasks)]), [],
                  {"simulated": True}, "(SIMULATED data: no evidence about real patients)")


def audio_encoder(cfg: PipelineConfig, lay: PipelineLayout, inputs: Inputs, threads: int,
                  seed: int | None = None) -> tuple[str, str]:
    """(encoder name, checkpoint) of the embed stage; pretrains the tiny HTS-AT first when asked.

    ``seed``: pretrain the encoder of that evaluation seed (after the first) into its own folder,
    seeded ``pretrain.seed + (seed - first seed)``.
    """
    if not cfg.encoder.pretrain:
        return cfg.encoder.name, cfg.encoder.checkpoint
    pcfg = copy.deepcopy(cfg.pretrain)
    out = lay.encoder if seed is None else lay.seed_encoder(seed)
    if seed is not None:
        pcfg.seed = int(pcfg.seed) + int(seed) - int(cfg.evaluate.seeds[0])
    pcfg.manifests, pcfg.out_dir, pcfg.progress = [str(inputs.manifest)], str(out), False
    pcfg.task_files = list(inputs.task_files)  # the run's tasks: zero-shot-only datasets are refused
    pcfg.torch_threads = pcfg.torch_threads or threads
    return "opera-ct", str(pretrain(pcfg, resume=True))


def embed_text_stage(cfg: PipelineConfig, lay: PipelineLayout, manifest: Path) -> dict:
    """Stage 1's text targets from the same (cut) LLM that stage 2 fine-tunes."""
    backbone = load_configured_backbone(cfg.finetune.model, device=cfg.device)
    return embed_texts(manifest, lay.text, backbone, batch_size=cfg.text.batch_size)


def seed_encoders(cfg: PipelineConfig, lay: PipelineLayout, inputs: Inputs, threads: int, stage) -> dict:
    """{seed: [audio store]}: when the run pretrains its encoder, every seed after the first pretrains its own
    encoder and embeds with it (its stage 1 and every system of that seed then use those embeddings)."""
    if not (cfg.encoder.pretrain and cfg.evaluate.stage1_per_seed):
        return {}
    stores = {}
    for seed in cfg.evaluate.seeds[1:]:
        name, ckpt = stage(f"pretrain-audio seed{seed}", audio_encoder, cfg, lay, inputs, threads, int(seed))
        stage(f"embed seed{seed}", embed_manifest, inputs.manifest, lay.seed_audio(seed), name, checkpoint=ckpt,
              batch_size=cfg.encoder.batch_size, device=cfg.device, progress=False)
        stores[int(seed)] = [str(lay.seed_audio(seed))]
    return stores


def align_config(cfg: PipelineConfig, lay: PipelineLayout, manifest: Path, threads: int, task_files=(), tasks=()):
    """Stage 1's settings: the run's tasks (stage 1 aligns on their supervised datasets), the stores.

    When every seed re-trains stage 1 (``evaluate.stage1_per_seed``), this run is the first seed's,
    seeded with it, and the protocol reuses it for that seed (:func:`evaluate_config`).
    """
    acfg = copy.deepcopy(cfg.align)
    acfg.task_files, acfg.tasks = list(task_files), list(tasks)
    acfg.audio_store, acfg.text_store, acfg.manifest = str(lay.audio), str(lay.text), str(manifest)
    acfg.out_dir, acfg.progress, acfg.threads = str(lay.align), False, acfg.threads or threads
    acfg.projector.in_dim = EmbeddingStore(lay.audio).dim
    if cfg.evaluate.stage1_per_seed:
        acfg.seed = int(cfg.evaluate.seeds[0])
    return acfg


def align_stage(cfg: PipelineConfig, lay: PipelineLayout, manifest: Path, threads: int, task_files=(), tasks=()):
    return train_align(align_config(cfg, lay, manifest, threads, task_files, tasks))


def finetune_config(cfg: PipelineConfig, lay: PipelineLayout, inputs: Inputs, threads: int):
    fcfg = quick_finetune(copy.deepcopy(cfg.finetune), cfg.quick)  # the quick cap every evaluated system gets
    fcfg.manifests, fcfg.task_files, fcfg.audio_store = [str(inputs.manifest)], list(inputs.task_files), [str(lay.audio)]
    fcfg.projector, fcfg.tasks, fcfg.seed = str(lay.align), list(inputs.trained), int(cfg.evaluate.seeds[0])
    fcfg.out_dir, fcfg.progress, fcfg.threads = str(lay.finetune(fcfg.seed)), False, fcfg.threads or threads
    return fcfg.validate()


def evaluate_config(cfg: PipelineConfig, lay: PipelineLayout, inputs: Inputs, fcfg, encoder_ckpt: str,
                    acfg=None):
    """The protocol's settings: the stage-2 run above is shared by ``respiramfm`` and ``missing_text``.

    With ``stage1_per_seed`` the protocol aligns every other seed itself with ``acfg`` (the
    pipeline's stage-1 settings) and reuses this run's projector for the first seed.
    """
    ecfg = copy.deepcopy(cfg.evaluate)
    ecfg.manifests, ecfg.task_files, ecfg.audio_store = [str(inputs.manifest)], list(inputs.task_files), [str(lay.audio)]
    ecfg.text_store, ecfg.projector, ecfg.encoder = str(lay.text), str(lay.align), encoder_ckpt
    ecfg.tasks, ecfg.out_dir, ecfg.quick = list(inputs.evaluated), str(lay.evaluate), bool(cfg.quick)
    ecfg.systems = available(list(ecfg.systems))
    options = {k: dict(v or {}) for k, v in ecfg.systems_options.items()}
    for name in ("respiramfm", "missing_text"):
        options.setdefault(name, {})["finetune_dir"] = str(lay.finetune())
    ecfg.systems_options = options
    ecfg.finetune = copy.deepcopy(fcfg)
    ecfg.budget = pipeline_budget(cfg.evaluate.budget, fcfg, cfg.quick)  # stage 2's budget is every system's
    if ecfg.stage1_per_seed:
        acfg = acfg or align_config(cfg, lay, inputs.manifest, 0, inputs.task_files, inputs.evaluated)
        ecfg.align = copy.deepcopy(acfg)
        ecfg.seed_projectors = {int(acfg.seed): str(lay.align)}
    return ecfg.validate()


def copy_model(src: Path, dest: Path) -> None:
    """Replace ``dest`` with a copy of the saved model directory (copy, then rename)."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def run_pipeline(cfg: PipelineConfig, callbacks: Sequence[PipelineCallback] = (), log: Callable = print) -> dict:
    """Run (or finish) every stage of ``cfg`` under ``cfg.out``; returns the summary written to demo_summary.json."""
    cfg.validate()
    if cfg.preset == "real":
        check_real(cfg)  # refuses before anything is written
    lay = PipelineLayout(cfg.out)
    lay.root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, lay.config)
    previous = torch.get_num_threads()
    threads = apply_threads(cfg.threads)
    try:
        stage = Stages(callbacks, log)
        if cfg.preset == "simulated":
            inputs = stage("prepare", prepare_simulated, cfg, lay)
        else:
            inputs = prepare_real(cfg, lay, stage)
        name, ckpt = stage("pretrain-audio", audio_encoder, cfg, lay, inputs, threads) if cfg.encoder.pretrain \
            else audio_encoder(cfg, lay, inputs, threads)
        stage("embed", embed_manifest, inputs.manifest, lay.audio, name, checkpoint=ckpt or None,
              batch_size=cfg.encoder.batch_size, device=cfg.device, progress=False)
        stage("embed-text", embed_text_stage, cfg, lay, inputs.manifest)
        stage("align", align_stage, cfg, lay, inputs.manifest, threads, inputs.task_files, inputs.evaluated)
        fcfg = finetune_config(cfg, lay, inputs, threads)
        stage("finetune", finetune, fcfg, callbacks=stage.training_callbacks("finetune"))
        copy_model(Path(fcfg.out_dir) / "model", lay.model)
        ecfg = evaluate_config(cfg, lay, inputs, fcfg, ckpt,
                               align_config(cfg, lay, inputs.manifest, threads, inputs.task_files, inputs.evaluated))
        ecfg.seed_audio_stores = seed_encoders(cfg, lay, inputs, threads, stage)
        stage("evaluate", evaluate, ecfg, log=log)
    finally:
        torch.set_num_threads(previous)
    summary = {**inputs.facts, "audio_encoder": name, "llm": cfg.finetune.model.backbone,
               "llm_layers": cfg.finetune.model.num_layers or "all", "systems": ecfg.systems, "seeds": ecfg.seeds,
               "threads": threads}
    return finish(lay, summary, stage.timings, inputs.headline, log)


def finish(lay: PipelineLayout, summary: dict, timings: dict, headline: str, log: Callable = print) -> dict:
    """Copy the report to ``OUT/report.html``, write ``OUT/demo_summary.json`` and print where things are."""
    atomic_write_bytes(lay.report, (lay.evaluate / "report.html").read_bytes())
    summary = {**summary, "out": str(lay.root), "seconds": timings, "total_seconds": round(sum(timings.values()), 1),
               "model": str(lay.model), "report": str(lay.report)}
    align_summary = lay.align / "summary.json"
    if align_summary.exists():
        summary["align"] = json.loads(align_summary.read_text())
    atomic_write_json(lay.summary, summary)
    log(f"\n== demo finished {headline}")
    log(f"   outputs under {lay.root}/ ; summary: {lay.summary}")
    results = lay.evaluate / "results.md"
    if results.exists():
        log("\n" + results.read_text())
    log(f"   stage timings (s): {timings}")
    log(f"   trained model: {lay.model}")
    log(f"   report: {lay.report}")
    return summary


__all__ = ["Inputs", "PipelineCallback", "copy_model", "finish", "run_pipeline"]
