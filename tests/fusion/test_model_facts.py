"""A served model says what it learned from and decides at its validation threshold (fusion/model_facts.py).

The model is the serving tests' tiny one (real OPERA-CT fixture encoder, tiny Llama, random weights) with
a recorded threshold for T4 and a training record saying it was trained on a simulated lung dataset only;
a second copy's projector claims another encoder, a third another LLM layer cut.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from respiramfm.cli import main
from respiramfm.data.records import Record, write_manifest
from respiramfm.evaluate.metrics import bootstrap_auroc
from respiramfm.fusion.predict import Predictor
from respiramfm.models.fusion import RespiraMFM

pytestmark = pytest.mark.usefixtures("one_thread")

TRAINED_ON = {"simulated": True, "val_source": "manifest", "tasks_trained": ["T4"],
              "tasks_not_trained": ["T1", "T7"], "projector": {},
              "datasets": {"icbhi": {"simulated": True, "train_records": 30, "val_records": 8,
                                     "train_patients": 12, "val_patients": 4}}}
THRESHOLD = {"threshold": 0.5, "rule": "youden", "target": None, "val_sensitivity": 0.8, "val_specificity": 0.75,
             "n_val": 8, "n_val_pos": 4}


def _restamp(src: Path, dest: Path, provenance: dict | None = None, **attrs) -> Path:
    model = RespiraMFM.from_pretrained(src)
    for k, v in attrs.items():
        setattr(model, k, v)
    if provenance is not None:
        model.projector_provenance = provenance
    model.save_pretrained(dest)
    shutil.copy(src / "encoder.safetensors", dest / "encoder.safetensors")
    return dest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, opera_fixtures) -> Path:
    from respiramfm.serve.tiny import build_tiny_model

    encoder = opera_fixtures / "opera_ct_tiny_seed0.safetensors"
    return build_tiny_model(tmp_path_factory.mktemp("facts") / "plain", encoder)


@pytest.fixture(scope="module")
def stamped(tiny) -> Path:
    return _restamp(tiny, tiny.parent / "stamped", thresholds={"T4": THRESHOLD}, trained_on=TRAINED_ON)


@pytest.fixture(scope="module")
def predictor(stamped) -> Predictor:
    return Predictor.from_pretrained(stamped)


def test_answers_carry_the_decision_and_the_simulated_training(predictor):
    for text in ("wheezing and a chronic cough", "no symptoms"):
        out = predictor.predict(symptoms=text, task="T4")
        assert out["decision"] == int(out["probability"] >= 0.5) and out["threshold"] == 0.5
        assert "Youden" in out["threshold_rule"] and "validation" in out["threshold_rule"]
        assert any("SIMULATED data only" in w and "never seen a real recording" in w for w in out["warnings"])
        assert out["trained_on"]["simulated"] and out["trained_on"]["simulated_datasets"] == ["icbhi"]
    zero = predictor.predict(symptoms="dry cough", task="T1")
    assert zero["decision"] is None and zero["threshold"] is None
    assert zero["threshold_rule"] == "no threshold (zero-shot task: the model has no validation data for it)"
    assert any("never saw the" in w and "zero-shot" in w for w in zero["warnings"])


def test_manifest_reports_auroc_with_patient_ci_and_operating_points(predictor, tmp_path, capsys, stamped):
    recs = [Record(record_id=f"r{i}", patient_id=f"P{i // 2}", dataset="icbhi", audio_type="lung",
                   diagnosis="copd" if i % 4 < 2 else "healthy",
                   symptoms=["wheezing; dry cough", "none", "shortness of breath", "fever"][i % 4], split="test")
            for i in range(16)]
    manifest = write_manifest(recs, tmp_path / "m.csv")
    out = tmp_path / "preds.csv"
    rc = main(["predict", "--model", str(stamped), "--manifest", str(manifest), "--task", "T4", "--out", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    rows = list(csv.DictReader(out.open()))
    y = np.array([int(r["label"]) for r in rows])
    p = np.array([float(r["probability"]) for r in rows])
    assert [int(r["decision"]) for r in rows] == [int(v >= 0.5) for v in p] and rows[0]["threshold"] == "0.5"
    want = bootstrap_auroc(y, p, [f"icbhi/{r['patient_id']}" for r in rows], n_boot=1000, seed=0)
    m = summary["metrics"]
    assert m["auroc"]["auroc"] == pytest.approx(want.auroc) and m["auroc"]["ci_low"] == pytest.approx(want.ci_low)
    assert m["auroc"]["n_patients"] == 8 and m["operating_points"]["n_patients"] == 8
    assert set(m["operating_points"]) >= {"sens_at_spec90", "sens_at_spec95", "spec_at_sens90", "brier", "ece"}
    assert m["at_threshold"]["tp"] + m["at_threshold"]["fn"] == int(y.sum())
    assert json.loads(Path(summary["metrics_file"]).read_text()) == m
    assert any("SIMULATED" in w for w in summary["warnings"])


def test_api_tasks_health_and_predict_say_what_the_model_saw(predictor):
    from fastapi.testclient import TestClient

    from respiramfm.serve.app import create_app

    client = TestClient(create_app(predictor=predictor))
    tasks = {t["name"]: t for t in client.get("/tasks").json()["tasks"]}
    assert tasks["T4"]["role"] == "supervised" and tasks["T4"]["trained"] and tasks["T4"]["has_threshold"]
    t1 = tasks["T1"]  # the UK COVID-19 task: its dataset was never seen
    assert t1["role"] == "zero-shot" and t1["trained"] is False and t1["dataset_seen"] is False
    assert t1["description"].startswith("Never seen in training")
    health = client.get("/health").json()
    assert health["trained_on"]["simulated"] and health["trained_on"]["real_datasets"] == []
    r = client.post("/predict", data={"task": "T4", "symptoms": "wheezing"}).json()
    assert r["decision"] in (0, 1) and r["threshold"] == 0.5 and any("SIMULATED" in w for w in r["warnings"])
    page = _run_page(client.get("/health").json(), client.get("/tasks").json())
    assert page["selected"] == "T4"  # the one trained task, not T1 (listed first, never trained on)
    assert "(never seen in training)" in next(o for o in page["options"] if o.startswith("T1 "))
    assert "SIMULATED data: icbhi" in page["trained_on"] and "never seen a real recording" in page["trained_on"]
    assert page["trained_on_class"] == "sim-warning"


def _run_page(health: dict, tasks: dict) -> dict:
    """The page's own app.js on a minimal fake DOM (tests/testkit/page_harness.js) fed these answers."""
    import shutil as sh
    import subprocess

    from respiramfm.serve.app import STATIC_DIR

    node = sh.which("node")
    if node is None:
        pytest.skip("node is not installed")
    harness = Path(__file__).resolve().parents[1] / "testkit" / "page_harness.js"
    out = subprocess.run([node, str(harness), str(STATIC_DIR / "app.js"), json.dumps(health), json.dumps(tasks)],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_page_preselects_nothing_when_the_model_records_no_training(tiny):
    from fastapi.testclient import TestClient

    from respiramfm.serve.app import create_app

    client = TestClient(create_app(tiny))
    page = _run_page(client.get("/health").json(), client.get("/tasks").json())
    assert page["selected"] == "" and "does not record" in page["trained_on"]


def test_untampered_sections_load_and_bad_ones_are_refused(stamped, tmp_path):
    from respiramfm.errors import CheckpointError
    from respiramfm.models.saved import read_config

    assert read_config(stamped)["thresholds"]["T4"] == THRESHOLD
    for section, value, match in [("thresholds", {"T4": {**THRESHOLD, "threshold": 1.5}}, "probability"),
                                  ("thresholds", {"T4": {**THRESHOLD, "rule": "f1"}}, "rule"),
                                  ("thresholds", {"T4": {**THRESHOLD, "threshold": "0.5"}}, "threshold"),
                                  ("trained_on", {**TRAINED_ON, "extra": 1}, "unknown key"),
                                  ("trained_on", {**TRAINED_ON, "datasets": {"x": {"train_records": "9"}}},
                                   "train_records")]:
        d = tmp_path / f"bad_{section}_{match.replace(' ', '_')}"
        shutil.copytree(stamped, d)
        cfg = json.loads((d / "config.json").read_text())
        cfg[section] = value
        (d / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(CheckpointError, match=match):
            read_config(d)


@pytest.mark.parametrize("compat", [
    {"encoder": {"name": "opera-ct", "weights_hash": "0" * 64}},           # another encoder of the same width
    {"llm": {"arch": "llama", "layers": "first 1 of 2"}},                  # the LLM cut at another depth
])
def test_predict_and_serve_refuse_a_projector_aligned_with_something_else(tiny, tmp_path, compat):
    from respiramfm.align.compat import ProjectorMismatchError
    from respiramfm.serve.app import create_app

    d = _restamp(tiny, tmp_path / "other", provenance={"compat": compat})
    with pytest.raises(ProjectorMismatchError, match="projector"):
        Predictor.from_pretrained(d)
    with pytest.raises(ProjectorMismatchError):
        create_app(d)
