"""``evaluate`` audits its own tasks: a metadata field that alone predicts a label becomes a report warning."""

from __future__ import annotations

from types import SimpleNamespace

from respiramfm.data.records import Record, write_manifest
from respiramfm.data.tasks import get_task
from respiramfm.evaluate.audit import audit_eval, shortcut_section


def test_confounded_device_is_flagged_and_listed(tmp_path):
    recs = [Record(f"icbhi/r{i}", f"icbhi/{i}", "icbhi", audio_type="lung", diagnosis="copd" if i % 2 else "healthy",
                   device="Litt3200" if i % 2 else "Meditron", age=40 + i, split="test" if i < 6 else "train")
            for i in range(24)]
    write_manifest(recs, tmp_path / "m.csv")
    data = SimpleNamespace(manifests=[str(tmp_path / "m.csv")], records=recs,
                           tasks={"T4": get_task("T4"), "T7": get_task("T7")})
    logged = []
    res = audit_eval(data, log=logged.append)
    device = next(f for f in res["audits"][0]["fields"] if f["field"] == "device")
    assert device["auroc"] == 1.0 and device["flagged"]
    assert res["audits"][1] == {"task": "T7", "error": res["audits"][1]["error"]}  # no KAUH record: noted, no crash
    assert any("T4: device alone predicts the label" in w for w in res["warnings"])
    assert logged and all(line.startswith("[evaluate] WARNING: ") for line in logged)
    section = shortcut_section({"shortcuts": res})
    assert section.startswith("\n## Shortcut warnings") and "T4: device" in section
    assert shortcut_section({}) == "" and shortcut_section({"shortcuts": {"warnings": []}}) == ""
