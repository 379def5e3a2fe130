"""What a saved model says about itself in every answer: its decision threshold and what it learned from.

Stage 2 records two sections in the model directory (:mod:`respiramfm.models.saved`):

* ``thresholds``: per trained task, the decision threshold chosen on *validation* predictions
  (:func:`respiramfm.evaluate.operating.choose_threshold`: Youden by default, or the highest
  threshold reaching a target sensitivity). A task without one (a zero-shot task has no
  validation data; so has a task whose validation set held one class) gets no decision:
  ``decision`` is null and ``threshold_rule`` says why. We never invent a threshold such as 0.5.
* ``trained_on``: the datasets (real or simulated, record and patient counts), the tasks trained
  and the tasks the model can be asked about without having been trained on them, and the
  projector's record of the encoder, LLM and text space it was aligned with.

``predict`` and ``serve`` use these helpers so both answer alike, and refuse a model whose
projector was aligned with another encoder or LLM (layer cut included) than the model runs.
"""

from __future__ import annotations

NOT_RECORDED = "this model directory does not record what it was trained on (saved before this was recorded)"


def trained_on(model) -> dict:
    """The model's ``trained_on`` record for answers (``{"recorded": False, ...}`` when absent)."""
    rec = dict(getattr(model, "trained_on", {}) or {})
    if not rec:
        return {"recorded": False, "note": NOT_RECORDED}
    datasets = rec.get("datasets", {})
    sim = sorted(n for n, d in datasets.items() if d.get("simulated"))
    real = sorted(n for n, d in datasets.items() if not d.get("simulated"))
    return {"recorded": True, "simulated": bool(rec.get("simulated")) or bool(sim), "simulated_datasets": sim,
            "real_datasets": real, "tasks_trained": list(rec.get("tasks_trained", [])),
            "datasets": datasets}


def task_status(model, task) -> dict:
    """``trained`` (task trained in stage 2) and ``dataset_seen`` for one task; None when not recorded."""
    rec = getattr(model, "trained_on", {}) or {}
    if not rec:
        return {"trained": None, "dataset_seen": None}
    return {"trained": task.name in rec.get("tasks_trained", []),
            "dataset_seen": task.dataset in rec.get("datasets", {})}


def warnings_for(model, task) -> list[str]:
    """The warnings every answer about ``task`` carries: simulated training data, a task never trained."""
    out = []
    facts = trained_on(model)
    if facts["recorded"] and facts["simulated"]:
        only = not facts["real_datasets"]
        out.append(f"this model was trained on SIMULATED data{' only' if only else ''} "
                   f"({', '.join(facts['simulated_datasets'])}): "
                   + ("it has never seen a real recording; its output is no evidence about real patients"
                      if only else "part of its training data is synthetic"))
    status = task_status(model, task)
    if status["dataset_seen"] is False:
        out.append(f"task {task.name}: the model never saw the {task.dataset} dataset in training; this is a "
                   "zero-shot answer")
    elif status["trained"] is False:
        out.append(f"task {task.name} was not trained in stage 2; this is a zero-shot answer")
    return out


def decision(model, task, prob: float) -> dict:
    """The decision at the task's validation threshold, or why there is none."""
    t = (getattr(model, "thresholds", {}) or {}).get(task.name)
    if t is None:
        status = task_status(model, task)
        if status["trained"] is False:
            why = "no threshold (zero-shot task: the model has no validation data for it)"
        elif status["trained"] is None:
            why = "no threshold (this model directory records none)"
        else:
            why = "no threshold (none recorded: the task's validation set held one class, or the model was saved " \
                  "before thresholds were recorded)"
        return {"decision": None, "threshold": None, "threshold_rule": why}
    rule = t.get("rule")
    text = "Youden index (max sensitivity + specificity - 1)" if rule == "youden" else \
        f"highest threshold reaching sensitivity {t.get('target')}"
    return {"decision": int(prob >= float(t["threshold"])), "threshold": float(t["threshold"]),
            "threshold_rule": f"{text} on validation (n={t.get('n_val')}: sensitivity "
                              f"{t.get('val_sensitivity', float('nan')):.3f}, specificity "
                              f"{t.get('val_specificity', float('nan')):.3f})"}


def check_compat(model, path=None, used_with: str = "predict") -> None:
    """Refuse (ProjectorMismatchError) a model whose projector was aligned with another encoder or LLM
    (layer cut included) than the model runs; fields a projector did not record are not compared."""
    from respiramfm.align.compat import check_projector

    enc = model.cfg.encoder
    audio = {"encoder": enc.name, "weights_hash": enc.weights_hash, "dim": enc.out_dim} if enc.name else None
    check_projector(model.projector_provenance, audio, model.base_identity, model.hidden_size, path=path,
                    used_with=used_with)


__all__ = ["check_compat", "decision", "task_status", "trained_on", "warnings_for"]
