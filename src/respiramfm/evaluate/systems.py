"""The protocol's own system, ``respiramfm``: stage 2 fine-tuned per seed, then every task's test records scored.

``trained_respiramfm`` is shared with the ablations that reuse the same model (``missing_text``);
``predict_tasks`` scores any loaded RespiraMFM on the protocol's test split.
"""

from __future__ import annotations

from pathlib import Path

from respiramfm.evaluate.budget import apply_budget, check_trained, options_budget, write_budget
from respiramfm.evaluate.data import EvalData
from respiramfm.evaluate.layout import finetune_dir
from respiramfm.evaluate.finetune_run import existing_run
from respiramfm.fusion.infer import items_to_resolved, predict_proba
from respiramfm.fusion.train import finetune
from respiramfm.fusion.train_config import FinetuneConfig
from respiramfm.models.fusion import RespiraMFM
from respiramfm.models.processing import InputProcessor


def trained_respiramfm(data: EvalData, seed: int, work_dir: Path, options: dict, system: str = "respiramfm"):
    """The protocol's RespiraMFM for ``seed``: fine-tuned (stage 2, selected on validation) and loaded.

    ``options["finetune_dir"]`` (optional, may contain ``{seed}``) puts the training run
    somewhere else than ``work_dir/finetune``, e.g. where ``respiramfm finetune`` already
    trained with the same config: training then resumes from its last checkpoint (no work).
    It trains with the unit's budget (``options["budget"]``, recorded in ``work_dir/budget.json``).
    """
    unit = options_budget(options, system)
    if options.get("finetune_run"):  # a finished `respiramfm finetune` run, checked against this evaluation
        model, cfg = existing_run(data, seed, options["finetune_run"])
        write_budget(work_dir, system, check_trained(cfg, unit, system, options["finetune_run"]))
        return model, cfg
    cfg: FinetuneConfig = apply_budget(options["finetune"], unit.budget)
    write_budget(work_dir, system, unit)
    run_dir = finetune_dir(work_dir, options.get("finetune_dir") or "", seed)
    cfg.manifests, cfg.task_files, cfg.audio_store = data.manifests, data.task_files, data.audio_store
    cfg.projector = data.projector or cfg.projector  # the seed's own projector when stage 1 runs per seed
    cfg.tasks, cfg.seed, cfg.out_dir, cfg.progress = list(data.supervised), int(seed), str(run_dir), False
    finetune(cfg)
    return RespiraMFM.from_pretrained(run_dir / "model"), cfg


def respiramfm_system(data: EvalData, seed: int, work_dir: Path, options: dict) -> dict:
    """Fine-tune RespiraMFM (:func:`trained_respiramfm`), then score every task's test records."""
    model, cfg = trained_respiramfm(data, seed, work_dir, options)
    return predict_tasks(model, data, batch_size=cfg.eval_batch_size)


def input_processor(model, audio_store: list[str]) -> InputProcessor:
    """The record -> model input rule for ``model`` on stored embeddings (no stores for a text-only model)."""
    return InputProcessor(stores=[] if model.cfg.mode == "text_only" else list(audio_store))


def predict_tasks(model, data: EvalData, batch_size: int = 32, drop_context: bool = False) -> dict:
    """{task: {record_id: prob}} on the test split; records without a needed embedding are left out.

    ``drop_context`` removes every record's context (inference with the text missing).
    """
    processor = input_processor(model, data.audio_store)
    use_audio = model.cfg.mode != "text_only"
    test = data.split("test")
    out: dict[str, dict[str, float]] = {}
    for name, task in data.tasks.items():
        items, ids = [], []
        for rec, _ in task.select(test):
            item, _why = processor.record_item(task, rec, use_audio=use_audio)
            if item is None:
                continue
            if drop_context:
                item.context = ""
            items.append(item)
            ids.append(rec.record_id)
        if items:
            probs = predict_proba(model, items_to_resolved(model, items), batch_size=batch_size)
            out[name] = {i: float(p) for i, p in zip(ids, probs)}
    return out


__all__ = ["input_processor", "predict_tasks", "respiramfm_system", "trained_respiramfm"]
