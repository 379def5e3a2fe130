"""Stage 1 inside the protocol: every seed aligns its own projector (``EvaluateConfig.stage1_per_seed``).

With one projector for every seed, the spread over seeds would measure stage 2 alone and
understate the variance of the method. With ``stage1_per_seed`` the protocol trains stage 1
(:func:`respiramfm.align.train.train_align`, seeded with the protocol's seed, on the training
split of the supervised tasks' datasets: align's own data selection) into ``OUT/stage1/seedN``
and gives that projector to every system of the seed that reads one (``respiramfm``,
``missing_text``, ``audio_only`` and any system using ``data.projector``). The data-efficiency
curve aligns each unit on its own patient subset the same way (:func:`align_on`).

``seed_projectors`` ({seed: dir}) names projectors already trained with the same align settings
and that seed (the pipeline's own stage 1), so they are not trained twice. A finished stage-1
run (``summary.json`` and the projector written) is reused on a rerun; an interrupted one
resumes from its checkpoint. ``seed_audio_stores`` ({seed: [dirs]}) gives a seed the embeddings of
its own pretrained encoder (the pipeline pretrains one per seed when it pretrains at all): that
seed's stage 1 and every system of the seed read them.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from respiramfm.align.train import AlignConfig, train_align
from respiramfm.cache.view import EmbeddingStore
from respiramfm.config import load_config, to_dict
from respiramfm.errors import ConfigError, RespiraMFMError
from respiramfm.evaluate.data import EvalData, write_records_manifest
from respiramfm.evaluate.layout import RunLayout

# Systems that never read the stage-1 projector (they train their own end to end, or use no audio projector).
NO_PROJECTOR = frozenset({"respllm", "no_alignment", "no_alignment_linear", "bts_frozen", "text_only",
                          "qwen2_audio", "meta_only"})


def uses_projector(system: str) -> bool:
    """Whether ``system`` reads ``data.projector`` (unknown systems are assumed to)."""
    return system not in NO_PROJECTOR


def finished(out_dir: Path) -> bool:
    return (out_dir / "summary.json").is_file() and (out_dir / "projector.safetensors").is_file()


_FREE = ("out_dir", "device", "threads", "progress", "figure", "resume", "checkpoint_every")  # result unchanged


def _same_settings(out_dir: Path, acfg: AlignConfig) -> bool:
    """Whether the finished run in ``out_dir`` was trained with ``acfg`` (fields that change no result aside)."""
    try:
        saved = to_dict(load_config(AlignConfig, out_dir / "config.yaml"))
    except RespiraMFMError:
        return False
    want = to_dict(acfg)
    return all(saved.get(k) == v for k, v in want.items() if k not in _FREE)


def align_on(cfg, data: EvalData, seed: int, out_dir: Path, manifest: Path | None = None, log=print) -> str:
    """Train (or reuse, or resume) stage 1 of ``seed`` on ``data``'s training patients into ``out_dir``.

    ``data`` must name one manifest, or ``manifest`` is where its records are written as one.
    A finished run with the same settings is reused; otherwise align's own resume rules apply
    (a checkpoint of other settings is refused). Returns the projector directory.
    """
    out_dir = Path(out_dir)
    if len(data.audio_store) != 1 or not data.text_store:
        raise ConfigError("stage 1 per seed needs exactly one audio_store and a text_store "
                          f"(have audio_store={data.audio_store!r}, text_store={data.text_store!r})")
    if len(data.manifests) == 1:
        source = data.manifests[0]
    elif manifest is None:
        raise ConfigError(f"stage 1 reads one manifest; the run has {len(data.manifests)}")
    else:
        if not Path(manifest).is_file():
            write_records_manifest(data, data.records, Path(manifest))
        source = str(manifest)
    acfg = copy.deepcopy(cfg.align)
    acfg.manifest, acfg.audio_store, acfg.text_store = str(source), data.audio_store[0], data.text_store
    acfg.task_files, acfg.tasks = list(data.task_files), list(data.tasks)
    acfg.seed, acfg.out_dir, acfg.progress = int(seed), str(out_dir), False
    acfg.projector.in_dim = EmbeddingStore(data.audio_store[0]).dim
    if finished(out_dir) and _same_settings(out_dir, acfg):
        return str(out_dir)
    log(f"[evaluate] stage 1 seed {seed}: aligning -> {out_dir}")
    train_align(acfg)
    return str(out_dir)


def seed_data(cfg, data: EvalData, layout: RunLayout, seed: int, pending: list[str], log=print) -> EvalData:
    """``data`` with seed ``seed``'s projector: reused, or aligned now when a pending unit reads it.

    Without ``stage1_per_seed`` the run's one projector (``cfg.projector``) serves every seed.
    """
    if not cfg.stage1_per_seed:
        return data
    stores = {int(k): list(v) for k, v in (cfg.seed_audio_stores or {}).items()}
    if int(seed) in stores:  # the seed's own pretrained encoder (the pipeline pretrains one per seed)
        data = replace(data, audio_store=stores[int(seed)])
    reuse = {int(k): str(v) for k, v in (cfg.seed_projectors or {}).items()}
    if int(seed) in reuse:
        return replace(data, projector=reuse[int(seed)])
    out = layout.stage1(seed)
    if not finished(out) and not any(uses_projector(n) for n in pending):
        return replace(data, projector="")  # nothing of this seed reads a projector
    first = int(seed) == int(cfg.seeds[0])
    run_cfg = cfg if first else replace(cfg, align=replace(cfg.align, figure=False))  # one t-SNE per run
    return replace(data, projector=align_on(run_cfg, data, seed, out, layout.stage1_manifest, log))


def stage1_record(cfg, layout: RunLayout) -> dict:
    """What the tables say about stage 1: per seed, the projector used and the hash of its weights."""
    from respiramfm.utils.io import sha256_file

    if not cfg.stage1_per_seed:
        return {"per_seed": False, "projector": cfg.projector}
    reuse = {int(k): str(v) for k, v in (cfg.seed_projectors or {}).items()}
    seeds = {}
    for seed in cfg.seeds:
        d = Path(reuse.get(int(seed)) or layout.stage1(seed))
        weights = d / "projector.safetensors"
        seeds[int(seed)] = {"dir": str(d), "sha256": sha256_file(weights) if weights.is_file() else None}
    return {"per_seed": True, "seeds": seeds}


__all__ = ["NO_PROJECTOR", "align_on", "finished", "seed_data", "stage1_record", "uses_projector"]
