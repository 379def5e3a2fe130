"""`respiramfm demo --quick` end to end: every stage, the model directory and the report."""

from __future__ import annotations

import json

import pytest

from respiramfm import cli


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_quick_demo_end_to_end(tmp_path, capsys, smollm2):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--out", str(out), "--quick"]) == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert set(summary["seconds"]) == {"prepare", "embed", "embed-text", "align", "finetune", "evaluate"}
    assert summary["audio_encoder"] == "logmel-stats" and summary["llm_layers"] == 4 and summary["simulated"] is True
    assert (out / "model" / "config.json").is_file() and (out / "model" / "head.safetensors").is_file()
    page = (out / "report.html").read_text()
    assert "SIMULATED" in page and "data:image/png;base64," in page and "https://" not in page
    for heading in ("Paired differences to respiramfm", "Operating points", "Training budget"):
        assert f"<h2>{heading}</h2>" in page, heading  # the protocol's paired CIs, operating points, one budget
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert results["simulated"] is True
    assert results["systems"] == ["respiramfm", "no_alignment", "respllm", "bts_frozen"]
    tasks = {r["task"] for r in results["rows"]}
    assert {f"SIM-T{i}" for i in range(1, 10)} <= tasks
    # the finetune stage's run is reused by the evaluation (no second training of seed 0)
    work = out / "evaluate" / "work" / "respiramfm"  # holds only each unit's budget record, no training run
    assert (out / "finetune" / "seed0" / "model").is_dir()
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()) == ["seed0/budget.json"]

    # The saved model answers right away, through the same encoder the demo embedded with.
    from respiramfm.data.records import read_manifest

    rec = next(r for r in read_manifest(out / "data" / "manifest.csv") if r.split == "test" and r.audio_path)
    audio = (out / "data" / rec.audio_path) if not rec.audio_path.startswith("/") else rec.audio_path
    capsys.readouterr()
    assert cli.main(["predict", "--model", str(out / "model"), "--audio", str(audio), "--task", "SIM-T5",
                     "--symptoms", "Patient presents with the following respiratory symptoms: fever, dry cough."]) == 0
    answer = json.loads(capsys.readouterr().out)
    assert 0.0 <= answer["probability"] <= 1.0
