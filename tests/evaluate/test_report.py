"""report.html from an evaluation directory written by hand: figures, labels, data efficiency."""

from __future__ import annotations

import json
import re

import pytest

from respiramfm.errors import DataError
from respiramfm.evaluate.report import build_report
from respiramfm.evaluate.results import markdown_table


def _summary(simulated: bool) -> dict:
    nan = float("nan")
    rows = [{"task": "T1", "group": "supervised", "system": "respiramfm", "dataset": "ukcovid19",
             "simulated": simulated, "n_test": 4, "seeds": [0], "auroc_per_seed": {"0": 0.75}, "mean": 0.75,
             "std": 0.0, "ci_low": 0.5, "ci_high": 1.0, "n": 4, "n_pos": 2, "n_patients": 4, "missing": 0,
             "reason": ""},
            {"task": "T5", "group": "zero-shot", "system": "respiramfm", "dataset": "coswara", "simulated": simulated,
             "n_test": 0, "seeds": [], "auroc_per_seed": {}, "mean": nan, "std": nan, "ci_low": nan, "ci_high": nan,
             "n": 0, "n_pos": 0, "n_patients": 0, "missing": 0, "reason": "no predictions"}]
    return {"rows": rows, "averages": {"respiramfm": {"supervised": {"mean": 0.75, "std": 0.0, "n_tasks": 1},
                                                      "zero-shot": {"mean": nan, "std": nan, "n_tasks": 0}}},
            "systems": ["respiramfm"], "seeds": [0], "tasks": ["T1", "T5"], "simulated": simulated, "n_boot": 10}


def _write(out, simulated: bool):
    from respiramfm.evaluate.results import _jsonable

    (out / "predictions" / "respiramfm").mkdir(parents=True)
    (out / "predictions" / "respiramfm" / "seed0.csv").write_text(
        "record_id,patient,task,label,prob\na,ds/a,T1,1,0.9\nb,ds/b,T1,0,0.2\nc,ds/c,T1,1,0.3\nd,ds/d,T1,0,0.4\n")
    (out / "results.json").write_text(json.dumps(_jsonable(_summary(simulated))))


@pytest.mark.parametrize("simulated", [False, True])
def test_report_sections_and_simulated_label(tmp_path, simulated):
    _write(tmp_path, simulated)
    (tmp_path / "efficiency" / "respiramfm").mkdir(parents=True)
    (tmp_path / "efficiency" / "respiramfm" / "data_efficiency.json").write_text(json.dumps({
        "simulated": simulated, "fractions": [0.1, 0.5, 1.0], "metric": "mean supervised AUROC",
        "systems": {"respiramfm": {"mean": [0.6, 0.7, 0.75], "std": [0.05, 0.03, 0.02]}}}))
    page = build_report(tmp_path).read_text()
    assert len(re.findall(r"data:image/png;base64,", page)) == 2  # ROC T1 + data efficiency
    assert (tmp_path / "figures" / "roc_T1.png").is_file() and (tmp_path / "figures" / "data_efficiency.png").is_file()
    assert "0.750 ± 0.000 [0.500, 1.000]" in page and "no predictions" in page
    assert ("SIMULATED" in page) is simulated


def test_markdown_marks_simulated_rows():
    md = markdown_table(_summary(True))
    assert "| T1 (SIMULATED) | supervised | 4 (2) | 0.750 ± 0.000 [0.500, 1.000] |" in md
    assert "| T5 (SIMULATED) | zero-shot | – | – |" in md and "SIMULATED data" in md


def test_report_needs_results(tmp_path):
    with pytest.raises(DataError, match="results.json"):
        build_report(tmp_path)


def test_report_shows_the_paired_difference_table(tmp_path):
    from respiramfm.evaluate.results import _jsonable

    summary = _summary(True)
    summary["systems"] = ["respiramfm", "audio_only"]
    summary["averages"]["audio_only"] = summary["averages"]["respiramfm"]
    summary["paired"] = {"n_excluded": 3, "excluded": [], "n_per_task": {"T1": 4, "T5": 0}}
    summary["differences"] = [
        {"task": "T1", "system": "audio_only", "reference": "respiramfm", "diff": -0.25, "ci_low": -0.5,
         "ci_high": 0.0, "n": 4, "n_pos": 2, "n_patients": 4, "n_boot": 10, "seeds": [0], "reason": ""},
        {"task": "T5", "system": "audio_only", "reference": "respiramfm", "diff": float("nan"),
         "ci_low": float("nan"), "ci_high": float("nan"), "n": 0, "n_pos": 0, "n_patients": 0, "n_boot": 0,
         "seeds": [], "reason": "no records scored by both systems"}]
    _write(tmp_path, True)
    (tmp_path / "results.json").write_text(json.dumps(_jsonable(summary)))  # NaN -> null, as written by a run
    page = build_report(tmp_path).read_text()
    assert "Paired differences to respiramfm" in page and "-0.250 [-0.500, +0.000]" in page
    assert "no records scored by both systems" in page
    assert "3 test record(s) without a usable audio embedding are left out for every system" in page


def test_report_states_the_llm_depth_and_lora_placement(tmp_path):
    """The report says at which depth, with which LoRA placement and whether through the trunk cache the LLM
    systems trained (read from the run's provenance: the stage-2 config every LLM system starts from)."""
    from respiramfm.evaluate.report import llm_setting

    _write(tmp_path, True)
    model = {"backbone": "smollm2-135m", "num_layers": 0, "lora": {"r": 8, "top_layers": 4}}
    (tmp_path / "provenance.json").write_text(json.dumps({"config": {"finetune": {"model": model,
                                                                                  "trunk_cache": True}}}))
    page = build_report(tmp_path).read_text()
    assert "every decoder layer (full depth), LoRA on the top 4 of them" in page and "frozen-trunk cache" in page
    cut = llm_setting({"model": {"backbone": "smollm2-135m", "num_layers": 4, "lora": {"top_layers": 0}}})
    assert "its first 4 decoder layers, LoRA on every one of them" in cut and "trunk cache" not in cut
    assert llm_setting({}) == ""
