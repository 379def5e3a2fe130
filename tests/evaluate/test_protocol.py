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


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("eval_synth"))


def overrides(synth, out: Path, **extra) -> list[str]:
    base = {"manifests": f"[{synth.manifest}]", "task_files": f"[{synth.tasks}]", "audio_store": f"[{synth.store}]",
            "projector": str(synth.projector), "out_dir": str(out), "n_boot": "100", "seeds": "[0, 1]"}
    base.update({f"finetune.{k}": v for k, v in FT.items()})
    base.update({k: str(v) for k, v in extra.items()})
    return [f"{k}={v}" for k, v in base.items()]


def _audio_lr(data, seed, work_dir, options):
    """A cheap real system: logistic regression on the audio embedding, fitted on train only."""
    from sklearn.linear_model import LogisticRegression

    from respiramfm.encoders.store import EmbeddingStore

    calls.append(seed)
    store = EmbeddingStore(data.audio_store[0])
    xy = [(store.get(r.record_id), y) for t in data.supervised for r, y in data.examples(t, "train")]
    clf = LogisticRegression(random_state=seed).fit(np.stack([x for x, _ in xy]), [y for _, y in xy])
    return {t: {r.record_id: float(clf.predict_proba(store.get(r.record_id)[None])[0, 1])
                for r, _ in data.examples(t, "test")} for t in data.tasks}


calls: list[int] = []
register_system("test_audio_lr", _audio_lr, "test: logistic regression on audio")


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
