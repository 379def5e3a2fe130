"""``respiramfm audit``: a metadata field that gives the label away is found and flagged, at patient level."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from respiramfm.cli import main
from respiramfm.data.records import Record, write_manifest
from respiramfm.data.tasks import get_task
from respiramfm.evaluate.audit import audit_task


def _cohort(tmp_path, n_patients: int = 24, seed: int = 0):
    """ICBHI-like COPD vs healthy records: the device gives the label away, sex is noise."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n_patients):
        copd = i % 2 == 0
        device = "Litt3200" if copd else "Meditron"
        rate = 4000 if copd else 44100
        for k in range(2):
            path = tmp_path / f"p{i}_{k}.wav"
            sf.write(path, rng.normal(0, 0.1, rate // 2).astype("float32"), rate)
            recs.append(Record(record_id=f"icbhi/p{i}_{k}", patient_id=f"icbhi/p{i}", dataset="icbhi",
                               audio_path=path.name, audio_type="lung", diagnosis="copd" if copd else "healthy",
                               age=float(rng.integers(20, 80)), sex=str(rng.choice(["male", "female"])),
                               device=device, location="trachea"))
    return recs


def test_confounded_device_is_flagged(tmp_path):
    recs = _cohort(tmp_path)
    res = audit_task(recs, get_task("T4"), tmp_path, n_boot=200)
    by = {f["field"]: f for f in res["fields"]}
    assert res["patients"] == 24 and res["positive_patients"] == 12 and res["records"] == 48
    assert by["device"]["auroc"] == 1.0 and by["device"]["flagged"]
    assert by["sample_rate"]["auroc"] == 1.0 and by["sample_rate"]["flagged"]
    assert by["device"]["values"]["Litt3200"] == {"records": 24, "positive_share": 1.0}
    assert by["location"]["note"] == "one value for every record" and not by["location"]["flagged"]
    assert by["filter"]["auroc"] is None and by["filter"]["note"] == "absent"
    assert not by["sex"]["flagged"] and by["sex"]["auroc"] < 0.8
    assert any("device alone predicts" in w for w in res["warnings"])


def test_audit_cli_writes_json(tmp_path, capsys):
    recs = _cohort(tmp_path)
    write_manifest(recs, tmp_path / "m.csv")
    assert main(["audit", str(tmp_path / "m.csv"), "--task", "T4", "--out", str(tmp_path / "a.json")]) == 0
    out = capsys.readouterr().out
    assert "device" in out and "<-- shortcut?" in out and "WARNING: T4: device" in out
    doc = json.loads((tmp_path / "a.json").read_text())
    assert doc["audits"][0]["task"] == "T4"
    # no task labels any record: a typed error, not a traceback
    assert main(["audit", str(tmp_path / "m.csv"), "--task", "T7"]) == 1
    assert "no record of the manifest" in capsys.readouterr().err
