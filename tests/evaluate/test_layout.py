"""The evaluation's leaf pieces: the system registry, the run layout and the one prediction format."""

from __future__ import annotations

import ast
from pathlib import Path
from types import SimpleNamespace

import pytest

from respiramfm.data.records import Record
from respiramfm.data.tasks import Task
from respiramfm.errors import ConfigError, DataError
from respiramfm.evaluate import registry
from respiramfm.evaluate.layout import RunLayout, finetune_dir
from respiramfm.evaluate.predictions import by_task, read_predictions, write_predictions

SRC = Path(registry.__file__)


def test_registry_is_a_leaf_and_names_every_builtin_system():
    imported = {n.module for n in ast.walk(ast.parse(SRC.read_text())) if isinstance(n, ast.ImportFrom)}
    assert {m for m in imported if m and m.startswith("respiramfm")} == {"respiramfm.errors"}
    assert list(registry.BUILTIN)[:2] == ["respiramfm", "respllm"] and "qwen2_audio" in registry.BUILTIN
    assert registry.describe("respiramfm").startswith("RespiraMFM")
    with pytest.raises(ConfigError, match="unknown system 'nope'"):
        registry.get_system("nope")

    def fit(data, seed, work_dir, options):
        return {}

    registry.register_system("test_layout_fit", fit, "a test system")
    assert registry.get_system("test_layout_fit") is fit and "test_layout_fit" in registry.system_names()
    assert registry.available(["test_layout_fit", "nope"]) == ["test_layout_fit"]


def test_run_layout_names_every_folder_once(tmp_path):
    lay = RunLayout(tmp_path)
    assert lay.predictions("bts_frozen", 2) == tmp_path / "predictions" / "bts_frozen" / "seed2.csv"
    assert lay.work("respllm", 0) == tmp_path / "work" / "respllm" / "seed0"
    assert lay.finetune_run("respiramfm", 1, str(tmp_path / "ft" / "seed{seed}")) == tmp_path / "ft" / "seed1"
    assert finetune_dir(tmp_path / "w") == tmp_path / "w" / "finetune"
    eff = lay.efficiency("respiramfm")
    assert eff.predictions(0.05, 1) == tmp_path / "efficiency" / "respiramfm" / "runs" / "f0.05" / "seed1" / "predictions.csv"
    assert eff.summary.parent == eff.root and lay.report == tmp_path / "report.html"
    eff.summary.parent.mkdir(parents=True)
    eff.summary.write_text("{}")
    assert lay.efficiency_summaries() == [eff.summary]


def test_one_prediction_format_round_trips_and_refuses_what_is_not_a_test_record(tmp_path):
    task = Task("X-T1", "dsx", disease="COPD", disease_phrase="COPD", positive=("copd",), negative=("healthy",),
                audio_type="lung", role="supervised", simulated=True)
    recs = [Record(record_id="=HYPERLINK(1)", patient_id="p1", dataset="dsx", diagnosis="copd", split="test"),
            Record(record_id="r2", patient_id="p2", dataset="dsx", diagnosis="healthy", split="test"),
            Record(record_id="r3", patient_id="p3", dataset="dsx", diagnosis="copd", split="train")]
    data = SimpleNamespace(tasks={"X-T1": task}, split=lambda s: [r for r in recs if r.split == s])
    path = tmp_path / "p" / "seed0.csv"
    assert write_predictions(path, data, {"X-T1": {"=HYPERLINK(1)": 0.75, "r2": 0.25}}, "sys") == 2
    assert "\n=HYPERLINK" not in path.read_text()  # a formula-looking cell is written neutralised
    rows = read_predictions(path)
    assert by_task(rows) == {"X-T1": {"=HYPERLINK(1)": 0.75, "r2": 0.25}}
    assert [(r["patient"], r["label"]) for r in rows] == [("dsx/p1", 1), ("dsx/p2", 0)]
    with pytest.raises(DataError, match="not a test record"):
        write_predictions(path, data, {"X-T1": {"r3": 0.5}}, "sys")
    with pytest.raises(DataError, match="not in \\[0, 1\\]"):
        write_predictions(path, data, {"X-T1": {"r2": 1.5}}, "sys")
    with pytest.raises(DataError, match="unknown task"):
        write_predictions(path, data, {"X-T9": {"r2": 0.5}}, "sys")
