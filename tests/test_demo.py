"""`respiramfm demo --quick` end to end: every stage, the model directory and the report."""

from __future__ import annotations

import json

import pytest

from respiramfm import cli


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["seconds"]) >= {"prepare", "pretrain-audio", "embed", "embed-text", "align", "finetune",
                                       "evaluate"}
    assert (out / "model" / "config.json").is_file() and (out / "model" / "head.safetensors").is_file()
    page = (out / "report.html").read_text()
    assert "SIMULATED" in page and "data:image/png;base64," in page and "https://" not in page
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert results["simulated"] is True and "respiramfm" in results["systems"]
    tasks = {r["task"] for r in results["rows"]}
    assert {f"SIM-T{i}" for i in range(1, 10)} <= tasks
    # the finetune stage's run is reused by the evaluation (no second training of seed 0)
    assert (out / "finetune" / "seed0" / "model").is_dir() and not (out / "evaluate" / "work" / "respiramfm").exists()
