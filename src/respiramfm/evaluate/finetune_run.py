"""``finetune_run: DIR`` in an evaluate config: score a finished ``respiramfm finetune`` run instead of training.

The run's own saved settings (``DIR/config.yaml``) are read and become the evaluation's
``finetune`` section (:func:`apply_finetune_run`), so the evaluate config does not repeat it; before the model is used, the run must have trained on what this
evaluation evaluates: the same manifests, task files, audio store(s) and projector (compared as
resolved paths), the same supervised tasks, and the seed being evaluated (``DIR`` may hold
``{seed}``, one run per seed). Anything else is a :class:`~respiramfm.errors.ConfigError` that
names the run and the difference; nothing is retrained or overwritten. When the evaluation aligns
stage 1 per seed, each seed's projector is taken from its run instead (:func:`apply_finetune_run`).
"""

from __future__ import annotations

from pathlib import Path

from respiramfm.config import load_config
from respiramfm.errors import ConfigError
from respiramfm.fusion.data import default_tasks
from respiramfm.fusion.train_config import FinetuneConfig


def _paths(items) -> list[str]:
    return sorted(str(Path(p).resolve()) for p in items if p)


def run_config(run: str, seed: int) -> tuple[Path, FinetuneConfig]:
    """(run dir, its saved FinetuneConfig) for ``seed``; the run must be finished (``model/`` written)."""
    run_dir = Path(str(run).format(seed=seed))
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not (run_dir / "model").is_dir():
        raise ConfigError("finetune_run: not a finished `respiramfm finetune` run (needs config.yaml and model/)",
                          path=run_dir)
    return run_dir, load_config(FinetuneConfig, saved)


def check_run(run_dir: Path, cfg: FinetuneConfig, data, seed: int) -> None:
    """Refuse a run that trained on other data, tasks or seed than this evaluation (see the module doc)."""
    wanted = {"manifests": _paths(data.manifests), "task_files": _paths(data.task_files),
              "audio_store": _paths(data.audio_store)}
    diffs = [f"{k}: run {_paths(getattr(cfg, k))} vs evaluate {v}" for k, v in wanted.items()
             if _paths(getattr(cfg, k)) != v]
    run_tasks = sorted(cfg.tasks or default_tasks(cfg.task_files))
    if run_tasks != sorted(data.supervised):
        diffs.append(f"tasks: run trained on {run_tasks}, evaluate trains on {sorted(data.supervised)}")
    if data.projector and cfg.projector and _paths([cfg.projector]) != _paths([data.projector]):
        diffs.append(f"projector: run {cfg.projector} vs evaluate {data.projector}")
    if int(cfg.seed) != int(seed):
        diffs.append(f"seed: run {cfg.seed} vs evaluate seed {seed} (set seeds: [{cfg.seed}], or give a "
                     "finetune_run holding {seed} with one run per seed)")
    if diffs:
        raise ConfigError("finetune_run trained on something else than this evaluation: " + "; ".join(diffs),
                          path=run_dir)


def apply_finetune_run(cfg) -> None:
    """Fill an EvaluateConfig from its ``finetune_run`` (before any work; nothing when it has none).

    * ``finetune`` becomes the run's saved config (first seed's run), so the evaluation's shared
      budget, when ``budget`` is not written, is the one the run trained with and every other LLM
      system trains with it too; an explicit ``budget`` is kept and the run is checked against it.
    * With stage 1 per seed, each seed's projector is its run's (``seed_projectors``): the run was
      fine-tuned on top of one projector, and aligning a new one would only fail the check. A
      projector the config names for a seed itself is kept (and then checked).
    """
    if not cfg.finetune_run:
        return
    cfg.finetune = run_config(cfg.finetune_run, int(cfg.seeds[0]))[1]
    if not cfg.stage1_per_seed:
        return
    chosen = {int(k): v for k, v in (cfg.seed_projectors or {}).items()}
    for seed in cfg.seeds:
        if int(seed) not in chosen:
            chosen[int(seed)] = run_config(cfg.finetune_run, int(seed))[1].projector
    cfg.seed_projectors = chosen


def existing_run(data, seed: int, run: str):
    """(model, its FinetuneConfig) of a checked, finished run: what ``trained_respiramfm`` returns."""
    from respiramfm.models.fusion import RespiraMFM

    run_dir, cfg = run_config(run, seed)
    check_run(run_dir, cfg, data, seed)
    return RespiraMFM.from_pretrained(run_dir / "model"), cfg


__all__ = ["apply_finetune_run", "check_run", "existing_run", "run_config"]
