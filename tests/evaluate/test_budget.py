"""One budget for every trained system (issue 13, finding 2): what each system hands the training engine,
the explicit per-system override and its record, the refusals, the pipeline's single budget; the paper's
linear no-alignment ablation; RespLLM's FlattenHead reading the audio positions whatever the input order."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from testkit.finetune_synth import IN_DIM

from respiramfm.config import load_config, to_dict  # noqa: E402
from respiramfm.errors import ConfigError  # noqa: E402
from respiramfm.evaluate import baselines_llm  # noqa: E402
from respiramfm.evaluate.budget import (budget_of, pipeline_budget, quick_finetune, read_budget,  # noqa: E402
                                        unit_budget)
from respiramfm.evaluate.config import EvaluateConfig  # noqa: E402
from respiramfm.evaluate.data import load_eval_data  # noqa: E402
from respiramfm.evaluate.protocol import system_options  # noqa: E402
from respiramfm.evaluate.registry import get_system  # noqa: E402
from respiramfm.fusion import train as stage2  # noqa: E402
from respiramfm.models.configuration import FusionConfig  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

LLM_SYSTEMS = ["respiramfm", "missing_text", "audio_only", "text_only", "respllm", "no_alignment",
               "no_alignment_linear"]
MODEL = {"finetune.model.backbone": "tiny-llama", "finetune.model.tiny": "{hidden_size: 64, num_layers: 2, heads: 4}",
         "finetune.model.lora.r": "4", "finetune.model.lora.alpha": "8", "finetune.threads": "1"}
# deliberately unlike every built-in default: Adam, betas 0.8/0.9, cosine + warm-up, clipping, batch 6,
# 3 epochs, validation every 7 steps, patience 2, proportional mixing
SHARED = ("{optim: {optimizer: adam, lr: 0.002, betas: [0.8, 0.9], weight_decay: 0.01, schedule: cosine, "
          "warmup_steps: 3, max_grad_norm: 0.5}, epochs: 3, batch_size: 6, eval_every: 7, patience: 2, "
          "mixing: proportional, select_metric: val_mean_auroc, select_mode: max}")


class Stop(Exception):
    """Raised by the spy once a system has handed its budget and its planned epochs to the engine."""


@pytest.fixture
def engine_spy(monkeypatch):
    """Every Trainer built by stage 2 or the end-to-end systems: the budget and the planned step batches."""
    seen: list[dict] = []

    def spy(task, budget, run, **kw):
        seen.append({"budget": to_dict(budget), "epochs_planned": len(task.plans),
                     "largest_batch": max(len(b) for plan in task.plans for b in plan)})
        raise Stop

    monkeypatch.setattr(stage2, "Trainer", spy)
    monkeypatch.setattr(baselines_llm, "Trainer", spy)
    return seen


def _config(synth, out, **sets) -> EvaluateConfig:
    base = {"manifests": f"[{synth.manifest}]", "task_files": f"[{synth.tasks}]", "audio_store": f"[{synth.store}]",
            "projector": str(synth.projector), "out_dir": str(out), **MODEL}
    if any(f.name == "stage1_per_seed" for f in dataclasses.fields(EvaluateConfig)):
        base["stage1_per_seed"] = "false"  # the synthetic projector serves every seed here
    base.update(sets)
    return load_config(EvaluateConfig, None, [f"{k}={v}" for k, v in base.items()]).validate()


def _handed(cfg, name, work, spy) -> dict:
    """What system ``name`` handed the engine when run through the protocol's options."""
    with pytest.raises(Stop):
        get_system(name)(load_eval_data(cfg), 0, work, system_options(cfg, name))
    return spy.pop()


def test_every_llm_system_hands_the_engine_the_one_budget(synth, tmp_path, engine_spy):
    cfg = _config(synth, tmp_path / "ev", budget=SHARED)
    shared = to_dict(cfg.budget)
    assert shared["optim"]["optimizer"] == "adam" and shared["mixing"] == "proportional"
    for name in LLM_SYSTEMS:
        got = _handed(cfg, name, tmp_path / name, engine_spy)
        assert got["budget"] == shared, name  # optimiser, betas, wd, schedule, warm-up, clipping, cadence, mixing
        assert got["epochs_planned"] == 3 and got["largest_batch"] == 6, name  # the batches it really draws
        record = read_budget(tmp_path / name)
        assert record["trained_with_budget"] and record["budget"] == shared and record["same_as_shared"], name
        assert record["override"] is None and record["system"] == name


def test_an_explicit_override_is_the_only_way_to_another_budget_and_is_recorded(synth, tmp_path, engine_spy):
    cfg = _config(synth, tmp_path / "ev", budget=SHARED,
                  systems_options="{respllm: {budget: {epochs: 1, optim: {lr: 0.01}}}, respiramfm: {}}")
    respllm = _handed(cfg, "respllm", tmp_path / "r", engine_spy)["budget"]
    ours = _handed(cfg, "respiramfm", tmp_path / "m", engine_spy)["budget"]
    assert ours == to_dict(cfg.budget)
    assert {k for k in respllm if respllm[k] != ours[k]} == {"epochs", "optim"}
    assert respllm["epochs"] == 1 and respllm["optim"] == {**ours["optim"], "lr": 0.01}
    record = read_budget(tmp_path / "r")
    assert record["override"] == {"epochs": 1, "optim": {"lr": 0.01}} and not record["same_as_shared"]
    assert record["shared"] == ours and record["budget"] == respllm
    assert read_budget(tmp_path / "m")["same_as_shared"]
    # quick caps every system alike, override or not
    quick = _config(synth, tmp_path / "q", budget=SHARED, quick="true",
                    systems_options="{no_alignment: {budget: {epochs: 9}}}")
    assert {unit_budget(quick, n).budget.epochs for n in LLM_SYSTEMS} == {2}


def test_implicit_per_system_budgets_and_contradictions_are_refused(synth, tmp_path):
    with pytest.raises(ConfigError, match="systems_options.respllm.budget"):
        _config(synth, tmp_path, systems_options="{respllm: {e2e: {epochs: 5}}}")
    with pytest.raises(ConfigError, match="own budget"):
        _config(synth, tmp_path, systems_options="{audio_only: {optim.lr: 0.1}}")
    with pytest.raises(ConfigError, match="finetune.epochs"):
        _config(synth, tmp_path, budget=SHARED, **{"finetune.epochs": "5"})
    with pytest.raises(ConfigError, match="unknown key"):
        _config(synth, tmp_path, systems_options="{respllm: {budget: {epoch: 5}}}")
    with pytest.raises(ConfigError, match="select_metric"):
        _config(synth, tmp_path, budget="{select_metric: val_auroc}")
    # without a budget section the budget is stage 2's (finetune's keys), for every system
    cfg = _config(synth, tmp_path, **{"finetune.epochs": "5", "finetune.optim.lr": "0.02"})
    want = to_dict(budget_of(cfg.finetune))
    assert want["epochs"] == 5 and all(to_dict(unit_budget(cfg, n).budget) == want for n in LLM_SYSTEMS)


def test_bts_frozen_says_it_is_not_budget_trained(synth, tmp_path):
    cfg = _config(synth, tmp_path / "ev", budget=SHARED)
    get_system("bts_frozen")(load_eval_data(cfg), 0, tmp_path / "bts", system_options(cfg, "bts_frozen"))
    record = json.loads((tmp_path / "bts" / "budget.json").read_text())
    assert record["trained_with_budget"] is False and record["budget"] is None and "logistic" in record["note"]


@pytest.mark.parametrize("quick", [False, True])
def test_the_simulated_demo_gives_one_budget_to_every_system(quick):
    from respiramfm.pipeline import presets

    sim = presets.simulated(quick=quick)
    assert not any("budget" in (o or {}) or "e2e" in (o or {}) for o in sim.evaluate.systems_options.values())
    if not quick:
        assert "no_alignment_linear" in sim.evaluate.systems
    fcfg = quick_finetune(sim.finetune, quick)  # what the pipeline's own stage 2 trains with
    ev = dataclasses.replace(sim.evaluate, finetune=fcfg, budget=pipeline_budget(sim.evaluate.budget, fcfg, quick))
    want = to_dict(budget_of(fcfg))
    assert want["batch_size"] == sim.finetune.batch_size and want["optim"]["lr"] == sim.finetune.optim.lr
    assert {json.dumps(to_dict(unit_budget(ev, n).budget), sort_keys=True) for n in ev.systems} == {
        json.dumps(want, sort_keys=True)}
    other = budget_of(fcfg)
    other.batch_size += 1
    with pytest.raises(ConfigError, match="evaluate.budget"):
        pipeline_budget(other, fcfg, quick)


def _fdata(synth):
    from respiramfm.fusion.data import load_finetune_data

    return load_finetune_data([str(synth.manifest)], [str(synth.store)], [], [str(synth.tasks)])


def tiny_cfg(**kw) -> FusionConfig:
    return FusionConfig(backbone="tiny-llama", tiny={"hidden_size": 64, "num_layers": 2, "heads": 4}, **kw)


def test_the_paper_ablation_projector_is_one_linear_layer_and_trains(synth):
    from respiramfm.training.config import Budget, OptimConfig

    data = _fdata(synth)
    model = baselines_llm.build_no_alignment(tiny_cfg(), IN_DIM, seed=3, tasks=data.tasks, projector="linear")
    leaves = [m for m in model.projector.modules() if not list(m.children())]
    assert len(leaves) == 1 and type(leaves[0]) is nn.Linear
    assert (leaves[0].in_features, leaves[0].out_features) == (IN_DIM, 64)
    ours = baselines_llm.build_no_alignment(tiny_cfg(), IN_DIM, hidden=32, seed=3, tasks=data.tasks)
    assert any(isinstance(m, nn.LayerNorm) for m in ours.projector.modules())
    before = leaves[0].weight.detach().clone()
    budget = Budget(optim=OptimConfig(lr=0.003, weight_decay=0.0, schedule="constant"), epochs=1, batch_size=8,
                    select_metric="val_mean_auroc")
    result = baselines_llm.train_end_to_end(model, data, budget)
    assert result["steps"] > 0 and not torch.equal(before, leaves[0].weight)
    with pytest.raises(ConfigError, match="projector"):
        baselines_llm.build_no_alignment(tiny_cfg(), IN_DIM, projector="conv")


@pytest.mark.parametrize("order", [["audio", "prompt", "context"], ["prompt", "context", "audio"]])
def test_flatten_head_reads_exactly_the_audio_positions(synth, order):
    from respiramfm.fusion.infer import shared_prefix_logits

    data = _fdata(synth)
    model = baselines_llm.build_respllm(tiny_cfg(n_audio_tokens=1, order=order), IN_DIM, head="flatten", d_ff=8,
                                        seed=0, tasks=data.tasks)
    prep = baselines_llm.prepare_raw(model, data.val)
    idx = [i for i, t in enumerate(prep.tasks) if t == "FT-A"][:6]  # one prompt: one forward pass
    resolved = baselines_llm.resolved_batch(model, prep, idx)
    hiddens, feats = [], []
    run = model._run
    model._run = lambda *a, **k: (lambda out: (hiddens.append(out[0]), out)[1])(run(*a, **k))
    hook = model.head.register_forward_pre_hook(lambda m, args: feats.append(args[0]))
    try:
        with torch.no_grad():
            shared_prefix_logits(model, resolved)
    finally:
        hook.remove()
        del model._run
    (hidden,), (got,) = hiddens, feats
    prefix = len(resolved[0].segments[0][1]) if order[0] == "prompt" else 0  # a cached prompt is not in the batch
    columns, lasts = [], []
    for r in resolved:
        lengths = [v.shape[0] if k == "audio" else len(v) for k, v in r.segments]
        kinds = [k for k, _ in r.segments]
        columns.append(sum(lengths[:kinds.index("audio")]) - prefix)
        lasts.append(sum(lengths) - 1 - prefix)
    want = torch.stack([hidden[b, c, :8] for b, c in enumerate(columns)]).to(got.dtype)
    torch.testing.assert_close(got, want)
    if order[0] == "audio":  # the old rule (the last real position) would have read the context's last token
        assert all(c != last for c, last in zip(columns, lasts))


def test_budget_records_read_back_as_one_row_per_system(tmp_path):
    from respiramfm.evaluate.budget import budget_markdown, budget_rows, resolve, write_budget
    from respiramfm.evaluate.layout import RunLayout
    from respiramfm.fusion.train_config import FinetuneConfig

    layout = RunLayout(tmp_path)
    shared = budget_of(FinetuneConfig())
    for seed in (0, 1):
        write_budget(layout.work("respiramfm", seed), "respiramfm", resolve(shared, None, False, "respiramfm"))
        write_budget(layout.work("respllm", seed), "respllm", resolve(shared, {"epochs": 3}, False, "respllm"))
        write_budget(layout.work("bts_frozen", seed), "bts_frozen", None, note="logistic regression")
    rows = budget_rows(layout, ["respiramfm", "respllm", "bts_frozen", "qwen2_audio"], [0, 1])
    assert [(r["system"], r["seeds"]) for r in rows] == [("respiramfm", [0, 1]), ("respllm", [0, 1]),
                                                          ("bts_frozen", [0, 1]), ("qwen2_audio", [])]
    table = budget_markdown(rows)
    assert "| respiramfm | 0, 1 | adamw lr 1e-05" in table and "20 epochs" in table
    assert '[explicit override: {"epochs": 3}]' in table and "3 epochs" in table
    assert "not budget-trained: logistic regression" in table and "| qwen2_audio | - | no budget record |" in table


def test_our_evaluate_budget_is_our_stage_2_budget():
    """configs/evaluate.yaml's budget section = configs/finetune.yaml's budget keys (a pipeline with the
    ``ours`` settings refuses them differing), and its systems include the paper's ablation."""
    from pathlib import Path

    from respiramfm.fusion.train_config import FinetuneConfig

    root = Path(__file__).resolve().parents[2] / "configs"
    ev = load_config(EvaluateConfig, root / "evaluate.yaml")
    ft = load_config(FinetuneConfig, root / "finetune.yaml")
    assert to_dict(ev.budget) == to_dict(budget_of(ft))
    assert {"no_alignment", "no_alignment_linear", "respllm"} <= set(ev.systems)
    assert to_dict(pipeline_budget(ev.budget, quick_finetune(ft, True), True))["epochs"] == 2
