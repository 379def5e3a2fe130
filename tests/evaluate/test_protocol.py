"""`respiramfm evaluate` on a small synthetic stage-2 input: tables, guard, resume, report."""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from testkit.finetune_synth import make_synth

from respiramfm import cli  # noqa: E402
from respiramfm.config import load_config  # noqa: E402
from respiramfm.data.records import read_manifest, write_manifest  # noqa: E402
from respiramfm.errors import ConfigError, DataError  # noqa: E402
from respiramfm.evaluate.config import EvaluateConfig  # noqa: E402
from respiramfm.evaluate.data import load_eval_data  # noqa: E402
from respiramfm.evaluate.layout import RunLayout  # noqa: E402
from respiramfm.evaluate.predictions import read_predictions  # noqa: E402
from respiramfm.evaluate.protocol import evaluate  # noqa: E402
from respiramfm.evaluate.registry import register_system  # noqa: E402

FT = {"model.backbone": "tiny-llama", "model.tiny": "{hidden_size: 64, num_layers: 2, heads: 4}",
      "model.lora.r": "4", "model.lora.alpha": "8", "model.lora.dropout": "0.0", "optim.lr": "0.003",
      "optim.weight_decay": "0.0", "optim.warmup_steps": "0", "batch_size": "4", "epochs": "2", "threads": "1",
      "log_every": "5", "eval_batch_size": "16"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/evaluate/conftest.py


# stage 1 per seed: a few epochs of the tiny projector (32 hidden, like the fixture's own)
ALIGN = {"epochs": "4", "eval_every": "2", "checkpoint_every": "2", "batch_size": "16", "figure": "false",
         "projector.hidden": "32", "threads": "1"}


def text_store(synth) -> Path:
    """Stage 1's text targets, from the same tiny LLM that stage 2 fine-tunes (as the pipeline does)."""
    from respiramfm.fusion.train_config import FinetuneConfig
    from respiramfm.llm.text_store import embed_manifest
    from respiramfm.models.fusion import load_configured_backbone

    from respiramfm.models.processing import record_context

    cfg = load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in FT.items() if k.startswith("model.")])
    out = synth.root / "text_store"
    if not out.is_dir():  # the fixture's records carry metadata only: their context is the template wording
        with_text = synth.root / "with_context.csv"
        write_manifest([dataclasses.replace(r, context=record_context(r)) for r in read_manifest(synth.manifest)],
                       with_text)
        embed_manifest(with_text, out, load_configured_backbone(cfg.model), batch_size=16, progress=False)
    return out


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    s = make_synth(tmp_path_factory.mktemp("eval_synth"))
    text_store(s)
    return s


def overrides(synth, out: Path, **extra) -> list[str]:
    base = {"manifests": f"[{synth.manifest}]", "task_files": f"[{synth.tasks}]", "audio_store": f"[{synth.store}]",
            "projector": str(synth.projector), "out_dir": str(out), "n_boot": "100", "seeds": "[0, 1]",
            "text_store": str(text_store(synth))}
    base.update({f"finetune.{k}": v for k, v in FT.items()})
    base.update({f"align.{k}": v for k, v in ALIGN.items()})
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _audio_lr(data, seed, work_dir, options):
    """A cheap real system: logistic regression on the audio embedding, fitted on train only."""
    from sklearn.linear_model import LogisticRegression

    from respiramfm.encoders.store import EmbeddingStore

    calls.append(seed)
    projectors.append(data.projector)
    stores_seen.append((seed, list(data.audio_store)))
    store = EmbeddingStore(data.audio_store[0])
    xy = [(store.get(r.record_id), y) for t in data.supervised for r, y in data.examples(t, "train")
          if r.record_id in store]
    clf = LogisticRegression(random_state=seed).fit(np.stack([x for x, _ in xy]), [y for _, y in xy])
    return {t: {r.record_id: float(clf.predict_proba(store.get(r.record_id)[None])[0, 1])
                for r, _ in data.examples(t, "test") if r.record_id in store} for t in data.tasks}


def _every_record(data, seed, work_dir, options):
    """A system that scores every test record it is given, audio or not (as a text-only model would)."""
    return {t: {r.record_id: 0.25 + 0.5 * (hash(r.record_id) % 2) for r, _ in data.examples(t, "test")}
            for t in data.tasks}


calls: list[int] = []
projectors: list[str] = []  # data.projector as each call of _audio_lr saw it
stores_seen: list[tuple] = []  # (seed, data.audio_store) of each call
register_system("test_audio_lr", _audio_lr, "test: logistic regression on audio")
register_system("test_every_record", _every_record, "test: scores every test record given")


@pytest.fixture(scope="module")
def evaluated(synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_out")
    cfg = load_config(EvaluateConfig, None, overrides(synth, out, systems="[respiramfm, test_audio_lr]"))
    return out, evaluate(cfg, log=lambda *_: None)


def test_tables_predictions_and_provenance(synth, evaluated):
    out, summary = evaluated
    rows = {(r["task"], r["system"]): r for r in summary["rows"]}
    assert set(rows) == {(t, s) for t in ("FT-A", "FT-B", "FT-Z") for s in ("respiramfm", "test_audio_lr")}
    test_ids = {r.record_id for r in read_manifest(synth.manifest) if r.split == "test"}
    for system in ("respiramfm", "test_audio_lr"):
        for seed in (0, 1):
            with open(out / "predictions" / system / f"seed{seed}.csv") as fh:
                preds = list(csv.DictReader(fh))
            assert preds and {p["record_id"] for p in preds} <= test_ids
    a = rows[("FT-A", "respiramfm")]
    assert a["n"] == 8 and a["n_pos"] == 4 and a["n_patients"] == 8 and sorted(a["auroc_per_seed"]) == [0, 1]
    assert a["ci_low"] <= a["mean"] <= a["ci_high"] or not np.isfinite(a["ci_low"])
    assert rows[("FT-Z", "respiramfm")]["group"] == "zero-shot" and rows[("FT-Z", "respiramfm")]["n"] == 6
    # the audio carries the label (dimension 0 shift): the audio LR beats chance on the supervised tasks
    assert summary["averages"]["test_audio_lr"]["supervised"]["mean"] > 0.7
    md = (out / "results.md").read_text()
    assert "SIMULATED" in md and "| FT-A (SIMULATED) | supervised | 8 (4) |" in md and "Avg zero-shot" in md
    res = json.loads((out / "results.json").read_text())
    assert res["systems"] == ["respiramfm", "test_audio_lr"]
    assert "avg-supervised" in (out / "results.csv").read_text()
    prov = json.loads((out / "provenance.json").read_text())
    assert str(synth.manifest) in prov["data_sha256"] and prov["versions"]["torch"] and prov["seeds"] == [0, 1]
    assert (out / "work" / "respiramfm" / "seed0" / "finetune" / "model" / "config.json").is_file()
    layout = RunLayout(out)  # the one place that names the run's files
    assert layout.predictions("respiramfm", 1) == out / "predictions" / "respiramfm" / "seed1.csv"
    assert layout.finetune_run("respiramfm", 0) == out / "work" / "respiramfm" / "seed0" / "finetune"


def test_report_is_self_contained_and_labelled(evaluated):
    out, summary = evaluated
    page = (out / "report.html").read_text()
    assert summary["report"] == str(out / "report.html")
    assert page.count("data:image/png;base64,") >= 4  # 3 ROC + attention
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "SIMULATED" in page and "Attention over context tokens" in page
    assert (out / "figures" / "roc_FT-A.png").read_bytes()[:4] == b"\x89PNG"


def test_resume_skips_finished_units(synth, evaluated):
    out, _ = evaluated
    before = len(calls)
    stamp = (out / "predictions" / "test_audio_lr" / "seed0.csv").stat().st_mtime_ns
    cfg = load_config(EvaluateConfig, None, overrides(synth, out, systems="[respiramfm, test_audio_lr]",
                                                       report="false"))
    evaluate(cfg, log=lambda *_: None)
    assert len(calls) == before
    assert (out / "predictions" / "test_audio_lr" / "seed0.csv").stat().st_mtime_ns == stamp


def test_guard_refuses_test_patient_in_training(synth, tmp_path):
    recs = read_manifest(synth.manifest)
    test = next(r for r in recs if r.split == "test")
    # a second manifest re-using the test patient in training (check_no_leakage across manifests)
    leak = dataclasses.replace(test, record_id="leak-1", split="train")
    write_manifest([leak], tmp_path / "leak.csv")
    cfg = load_config(EvaluateConfig, None, overrides(synth, tmp_path / "o", systems="[test_audio_lr]"))
    cfg.manifests = [str(synth.manifest), str(tmp_path / "leak.csv")]
    with pytest.raises(DataError, match="more than one split|test patient"):
        load_eval_data(cfg)


def test_bad_system_output_and_unknown_system(synth, tmp_path):
    def cheat(data, seed, work_dir, options):
        r = data.examples("FT-A", "train")[0][0]
        return {"FT-A": {r.record_id: 0.5}}

    register_system("test_cheat", cheat)
    cfg = load_config(EvaluateConfig, None, overrides(synth, tmp_path / "o", systems="[test_cheat]", seeds="[0]"))
    with pytest.raises(DataError, match="not a test record"):
        evaluate(cfg, log=lambda *_: None)
    cfg = load_config(EvaluateConfig, None, overrides(synth, tmp_path / "o2", systems="[nope]"))
    with pytest.raises(ConfigError, match="unknown system"):
        evaluate(cfg, log=lambda *_: None)


def test_cli_reports_errors_cleanly(synth, tmp_path, capsys):
    rc = cli.main(["evaluate", "--set", f"manifests=[{tmp_path / 'missing.csv'}]", "--set",
                   f"out_dir={tmp_path / 'o'}"])
    assert rc == 1 and "respiramfm evaluate: error" in capsys.readouterr().err


def test_data_efficiency_hook_runs_nested_fractions_and_reaches_the_report(synth, tmp_path):
    out = tmp_path / "eff_out"
    cfg = load_config(EvaluateConfig, None, overrides(synth, out, systems="[test_audio_lr]", seeds="[0]",
                                                       data_efficiency="test_audio_lr",
                                                       efficiency_fractions="[0.25, 1.0]"))
    before = len(calls)
    evaluate(cfg, log=lambda *_: None)
    assert len(calls) == before + 1 + 2  # the main unit, then one retraining per fraction (first seed)
    eff = json.loads((out / "efficiency" / "test_audio_lr" / "data_efficiency.json").read_text())
    # every efficiency unit keeps its predictions in the protocol's one prediction format
    unit = read_predictions(RunLayout(out).efficiency("test_audio_lr").predictions(0.25, 0))
    assert unit and {r["task"] for r in unit} <= {"FT-A", "FT-B", "FT-Z"} and all(0 <= r["prob"] <= 1 for r in unit)
    assert eff["fractions"] == [0.25, 1.0] and eff["seeds"] == [0] and eff["simulated"] is True
    curve = eff["systems"]["test_audio_lr"]["mean"]
    assert len(curve) == 2 and all(0.0 <= v <= 1.0 for v in curve)
    full = json.loads((out / "results.json").read_text())
    mains = [r["mean"] for r in full["rows"] if r["system"] == "test_audio_lr" and r["group"] == "supervised"]
    assert curve[-1] == pytest.approx(float(np.mean(mains)), abs=1e-9)  # 100 % = the main run's fit
    page = (out / "report.html").read_text()
    assert "Data efficiency" in page and "SIMULATED data. test_audio_lr retrained" in page
    evaluate(cfg, log=lambda *_: None)  # resumes: nothing retrained
    assert len(calls) == before + 3
    # A second system's curve is its own (never the first one's saved predictions) and joins the plot.
    register_system("test_audio_lr_again", _audio_lr, "test: the same fit under another name")
    cfg.data_efficiency = "test_audio_lr_again"
    evaluate(cfg, log=lambda *_: None)
    assert len(calls) == before + 5
    page = (out / "report.html").read_text()
    assert "test_audio_lr, test_audio_lr_again retrained" in page
    bad = load_config(EvaluateConfig, None, overrides(synth, out, systems="[test_audio_lr]",
                                                       data_efficiency="test_audio_lr", efficiency_fractions="[0, 1]"))
    with pytest.raises(ConfigError, match="efficiency_fractions"):
        evaluate(bad, log=lambda *_: None)
    with pytest.raises(ConfigError):
        evaluate(load_config(EvaluateConfig, None, overrides(synth, out, systems="[test_audio_lr]",
                                                             data_efficiency="nope")), log=lambda *_: None)


def test_missing_text_reuses_the_respiramfm_run_and_drops_only_the_text(synth, tmp_path):
    out, run = tmp_path / "mt", tmp_path / "shared_run" / "seed{seed}"
    opts = "{respiramfm: {finetune_dir: '%s'}, missing_text: {finetune_dir: '%s'}}" % (run, run)
    cfg = load_config(EvaluateConfig, None, overrides(synth, out, systems="[respiramfm, missing_text]", seeds="[0]",
                                                       systems_options=opts, report="false"))
    evaluate(cfg, log=lambda *_: None)
    trained = json.loads((tmp_path / "shared_run" / "seed0" / "summary.json").read_text())
    assert trained["last_step"] > 0
    assert not (out / "work" / "missing_text").exists() or not any((out / "work" / "missing_text").rglob("*.safetensors"))
    full = {(r["task"], r["record_id"]): r["prob"] for r in read_predictions(out / "predictions" / "respiramfm" / "seed0.csv")}
    gone = {(r["task"], r["record_id"]): r["prob"] for r in read_predictions(out / "predictions" / "missing_text" / "seed0.csv")}
    assert full.keys() == gone.keys() and len(full) > 10
    assert max(abs(full[k] - gone[k]) for k in full) > 1e-4  # the text mattered, and only the text changed


def test_every_system_is_scored_on_the_same_test_records(tmp_path):
    # two test records have no audio embedding: a system that could score them (text only) must not
    s = make_synth(tmp_path / "data", drop=("ft_cough-test-001", "ft_lung-test-002"))
    out = tmp_path / "paired"
    cfg = load_config(EvaluateConfig, None, overrides(s, out, systems="[test_audio_lr, test_every_record]",
                                                       seeds="[0]", stage1_per_seed="false", text_store=""))
    summary = evaluate(cfg, log=lambda *_: None)
    sets = {}
    for system in ("test_audio_lr", "test_every_record"):
        for r in read_predictions(out / "predictions" / system / "seed0.csv"):
            sets.setdefault(system, {}).setdefault(r["task"], set()).add(r["record_id"])
    assert sets["test_audio_lr"] == sets["test_every_record"]
    assert "ft_cough-test-001" not in sets["test_every_record"]["FT-A"] and len(sets["test_every_record"]["FT-A"]) == 7
    assert summary["paired"]["n_excluded"] == 2 and summary["paired"]["n_per_task"]["FT-A"] == 7
    assert {e["record_id"] for e in summary["paired"]["excluded"]} == {"ft_cough-test-001", "ft_lung-test-002"}
    rows = {(r["task"], r["system"]): r for r in summary["rows"]}
    assert rows[("FT-A", "test_audio_lr")]["n"] == rows[("FT-A", "test_every_record")]["n"] == 7
    assert "same test records" in (out / "results.md").read_text()

    def skips_one(data, seed, work_dir, options):  # leaves a record of the common set unscored
        preds = _every_record(data, seed, work_dir, options)
        preds["FT-B"].pop(sorted(preds["FT-B"])[0])
        return preds

    register_system("test_skips_one", skips_one)
    cfg.systems = ["test_skips_one"]
    with pytest.raises(DataError, match="left 1 of the 7 common test record"):
        evaluate(cfg, log=lambda *_: None)
    assert not (out / "predictions" / "test_skips_one" / "seed0.csv").exists()  # not a finished unit


def test_paired_difference_table_in_tables_and_report(evaluated):
    out, summary = evaluated
    diffs = {(r["task"], r["system"]): r for r in summary["differences"]}
    assert set(diffs) == {(t, "test_audio_lr") for t in ("FT-A", "FT-B", "FT-Z")}
    a = diffs[("FT-A", "test_audio_lr")]
    rows = {(r["task"], r["system"]): r for r in summary["rows"]}
    assert a["reference"] == "respiramfm" and a["n"] == 8 and a["seeds"] == [0, 1]
    # the point difference is the difference of the two seed-mean AUROCs of the main table
    assert a["diff"] == pytest.approx(rows[("FT-A", "test_audio_lr")]["mean"] - rows[("FT-A", "respiramfm")]["mean"])
    assert a["ci_low"] <= a["diff"] <= a["ci_high"]
    md = (out / "results.md").read_text()
    assert "## Paired differences to respiramfm" in md and "| FT-A | 8 (4) |" in md
    assert json.loads((out / "results.json").read_text())["differences"][0]["reference"] == "respiramfm"
    assert "Paired differences to respiramfm" in (out / "report.html").read_text()


def test_each_seed_aligns_its_own_projector_and_its_respiramfm_uses_it(evaluated):
    from respiramfm.fusion.train_config import FinetuneConfig
    from respiramfm.utils.io import sha256_file

    out, summary = evaluated
    weights = [out / "stage1" / f"seed{s}" / "projector.safetensors" for s in (0, 1)]
    assert all(w.is_file() for w in weights) and sha256_file(weights[0]) != sha256_file(weights[1])
    assert {s: v["sha256"] for s, v in summary["stage1"]["seeds"].items()} == {0: sha256_file(weights[0]),
                                                                               1: sha256_file(weights[1])}
    for seed in (0, 1):
        run = out / "work" / "respiramfm" / f"seed{seed}" / "finetune"
        assert load_config(FinetuneConfig, run / "config.yaml").projector == str(out / "stage1" / f"seed{seed}")
        model = json.loads((run / "model" / "config.json").read_text())
        assert model["projector"]["provenance"]["seed"] == seed  # the model carries its seed's projector
    md = (out / "results.md").read_text()
    assert "Every seed re-trains stage 1" in md


def test_data_efficiency_aligns_stage1_on_each_subset(synth, tmp_path):
    out = tmp_path / "eff_stage1"
    cfg = load_config(EvaluateConfig, None, overrides(synth, out, systems="[test_audio_lr]", seeds="[0]",
                                                       data_efficiency="test_audio_lr", report="false",
                                                       efficiency_fractions="[0.25, 1.0]"))
    del projectors[:]
    evaluate(cfg, log=lambda *_: None)
    eff = RunLayout(out).efficiency("test_audio_lr")
    small, full = (json.loads((eff.stage1(f, 0) / "summary.json").read_text()) for f in (0.25, 1.0))
    assert small["n_train"] < full["n_train"] == 48  # stage 1 saw the unit's patients only
    train_ids = {r.record_id for r in read_manifest(eff.manifest(0.25, 0)) if r.split == "train"}
    assert small["n_train"] == len(train_ids) == 2 * 6  # ceil(25 % of 24) per dataset
    assert projectors == [str(out / "stage1" / "seed0"), str(eff.stage1(0.25, 0)), str(eff.stage1(1.0, 0))]


def test_a_seed_with_its_own_encoder_aligns_and_scores_on_its_embeddings(synth, tmp_path):
    from respiramfm.evaluate.stage1 import finished

    other = make_synth(tmp_path / "seed1_encoder", seed=1)  # same records, another encoder's vectors
    out = tmp_path / "enc"
    cfg = load_config(EvaluateConfig, None, overrides(synth, out, systems="[test_audio_lr]", report="false",
                                                       seed_audio_stores="{1: [%s]}" % other.store))
    del stores_seen[:], projectors[:]
    evaluate(cfg, log=lambda *_: None)
    assert stores_seen == [(0, [str(synth.store)]), (1, [str(other.store)])]
    assert projectors == [str(out / "stage1" / "seed0"), str(out / "stage1" / "seed1")]
    assert finished(out / "stage1" / "seed1")
    saved = load_config(EvaluateConfig, out / "config.yaml")
    assert saved.seed_audio_stores == {1: [str(other.store)]}
    from respiramfm.align.train import AlignConfig
    assert load_config(AlignConfig, out / "stage1" / "seed1" / "config.yaml").audio_store == str(other.store)
    bad = load_config(EvaluateConfig, None, overrides(synth, out, stage1_per_seed="false",
                                                       seed_audio_stores="{1: [%s]}" % other.store))
    with pytest.raises(ConfigError, match="needs stage1_per_seed"):
        evaluate(bad, log=lambda *_: None)


def test_a_finished_stage1_is_reused_only_with_the_same_settings(synth, tmp_path):
    from respiramfm.evaluate.stage1 import align_on

    cfg = load_config(EvaluateConfig, None, overrides(synth, tmp_path / "o"))
    data = load_eval_data(cfg)
    out = tmp_path / "stage1"
    align_on(cfg, data, 3, out, log=lambda *_: None)
    stamp = (out / "projector.safetensors").stat().st_mtime_ns
    align_on(cfg, data, 3, out, log=lambda *_: None)  # finished, same settings: nothing trained
    assert (out / "projector.safetensors").stat().st_mtime_ns == stamp
    assert json.loads((out / "projector.json").read_text())["provenance"]["seed"] == 3
    cfg.align.lr = 0.01  # other settings: align's own resume rule refuses the old run's checkpoint
    with pytest.raises(ConfigError, match="different configuration"):
        align_on(cfg, data, 3, out, log=lambda *_: None)
