"""Task files: checked before anything is registered, every error naming the file and the line;
the rule for combining file and built-in tasks is printed by ``respiramfm tasks`` (docs/tasks.md)."""

from __future__ import annotations

import json

import pytest

from respiramfm.cli import main
from respiramfm.data.tasks import all_tasks, load_tasks_yaml, parse_tasks_yaml
from respiramfm.errors import ConfigError

GOOD = """tasks:
  - name: H5-COPD
    dataset: clinic
    disease: COPD
    positive: [copd]
    negative: healthy
    extra:
      exclude_extra: {quality: [bad]}
"""

BAD = {  # text -> (line, words in the message)
    "tasks:\n  - name: A\n    dataset: c\n    disease: COPD\n    postive: [copd]\n    negative: [h]\n":
        (5, ["unknown key 'postive'", "did you mean 'positive'"]),
    "tasks:\n  - name: A\n    dataset: c\n  - name: B\n    dataset: c\n": (2, ["missing disease, positive, negative"]),
    "tasks:\n  - name: A\n    dataset: c\n    disease: X\n    positive: [a]\n    negative: [b]\n    role: zeroshot\n":
        (7, ["role must be one of supervised, zero-shot"]),
    "tasks:\n  - name: A\n    dataset: c\n    disease: X\n    positive: [a]\n    negative: [a]\n":
        (2, ["both positive and negative"]),
    "tasks:\n  - name: A\n    dataset: c\n    disease: X\n    positive: [a]\n    negative: [b]\n"
    "  - name: A\n    dataset: c\n    disease: X\n    positive: [a]\n    negative: [b]\n": (7, ["defined twice", "line 2"]),
    "tasks:\n  - name: A\n   dataset: [c\n": (3, ["not valid YAML"]),
    "task:\n  - name: A\n": (1, ["one key, 'tasks'"]),
    "tasks:\n  - name: A\n    dataset: c\n    disease: X\n    positive: [a]\n    negative: [b]\n"
    "    extra:\n      min_extra: {q: high}\n": (7, ["extra.min_extra.q must be a number"]),
    "tasks:\n  - name: A\n    dataset: c\n    disease: X\n    positive: []\n    negative: [b]\n": (2, ["missing positive"]),
    "tasks:\n  - just a string\n": (2, ["each task must be a mapping"]),
}


def test_good_file_defaults_the_phrase_and_keeps_lines():
    [(task, line)] = parse_tasks_yaml(GOOD, "x.yaml")
    assert (task.name, line, task.disease_phrase, task.negative) == ("H5-COPD", 2, "COPD", ("healthy",))
    assert "H5-COPD" not in all_tasks()  # parsing registers nothing


@pytest.mark.parametrize("text", list(BAD))
def test_errors_name_file_and_line(tmp_path, text):
    f = tmp_path / "mine.yaml"
    f.write_text(text)
    line, words = BAD[text]
    with pytest.raises(ConfigError) as info:
        load_tasks_yaml(f)
    msg = str(info.value)
    assert msg.startswith(f"{f}: line {line}:"), msg
    assert all(w in msg for w in words), msg
    assert "A" not in all_tasks() and "B" not in all_tasks()  # nothing registered from a bad file


def test_tasks_command_states_the_combine_rule(tmp_path, capsys):
    f = tmp_path / "tasks.yaml"
    f.write_text(GOOD + "  - name: T7\n    dataset: clinic\n    disease: COPD\n    positive: copd\n"
                        "    negative: healthy\n    role: zero-shot\n")
    try:
        assert main(["tasks", "--no-prompt"]) == 0
        out = capsys.readouterr().out
        assert "With no task file, a run with tasks: [] evaluates T1, T2" in out and "trains on T1, T2, T3, T4." in out
        assert main(["tasks", "--task-file", str(f), "--no-prompt"]) == 0
        out = capsys.readouterr().out
        assert "evaluates H5-COPD, T7 and trains on H5-COPD." in out
        assert "ONLY the task files' tasks" in out and "tasks: [MY-TASK, T4, T7]" in out
        assert main(["tasks", "--task-file", str(f), "--json"]) == 0
        rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
        assert rows["T7"]["source"] == "file, replaces built-in" and rows["T7"]["dataset"] == "clinic"
        assert rows["T4"]["in_default_run"] is False and rows["H5-COPD"]["in_default_training"] is True
    finally:
        _restore_builtin_t7()


def _restore_builtin_t7():
    from respiramfm.data.task_defs import TASKS
    from respiramfm.data.tasks import register
    register(next(t for t in TASKS if t.name == "T7"), overwrite=True)


def test_runs_say_when_a_task_file_leaves_the_builtin_tasks_out():
    from respiramfm.data.tasks import rule_note

    note = rule_note(["mine.yaml"], [], ["H5-COPD"])
    assert "only their tasks run (H5-COPD)" in note and "tasks: [H5-COPD, T4, T7]" in note
    assert rule_note([], [], ["T1"]) is None and rule_note(["mine.yaml"], ["H5-COPD", "T4"], ["H5-COPD"]) is None
