"""``respiramfm tasks``: every task with its labels, role and prompt; task files checked before a run."""

from __future__ import annotations

import json

from respiramfm.cli import main

TASK_FILE = """tasks:
  - name: CLINIC-COPD
    dataset: clinic
    disease: COPD
    disease_phrase: chronic obstructive pulmonary disease (COPD)
    positive: [copd]
    negative: [healthy]
    audio_type: lung
    role: zero-shot
    description: This data comes from a clinic's stethoscope recordings.
"""


def test_lists_builtin_and_file_tasks(tmp_path, capsys):
    f = tmp_path / "tasks.yaml"
    f.write_text(TASK_FILE)
    assert main(["tasks", "--task-file", str(f), "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"T1", "T4", "T7", "T8", "CLINIC-COPD"} <= set(rows)
    t4, mine = rows["T4"], rows["CLINIC-COPD"]
    assert (t4["dataset"], t4["role"], t4["positive"], t4["negative"], t4["source"]) == (
        "icbhi", "supervised", ["copd"], ["healthy"], "built-in")
    assert rows["T8"]["unseen_disease"] and rows["T7"]["role"] == "zero-shot"
    assert (mine["role"], mine["source"]) == ("zero-shot", "file")
    assert "clinic's stethoscope recordings" in mine["prompt"] and "COPD" in mine["prompt"]
    assert main(["tasks", "--no-prompt"]) == 0
    text = capsys.readouterr().out
    assert "T2       coughvid" in text and "cough_detected" in text and "prompt:" not in text


def test_bad_task_file_is_a_typed_error(tmp_path, capsys):
    f = tmp_path / "tasks.yaml"
    f.write_text("tasks:\n  - name: X\n    dataset: clinic\n    positive: [a]\n")
    assert main(["tasks", "--task-file", str(f)]) == 1
    assert "respiramfm tasks: error:" in capsys.readouterr().err
