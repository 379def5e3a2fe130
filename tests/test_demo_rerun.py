"""The demo interrupted (SIGKILL) in every stage and run again finishes with the same report (issue 17, item 7).

One output folder is killed at the end of each stage, in the middle of stage 2 (right after
its first checkpoint) and in the middle of the evaluation (right after the first system's
predictions), each time by a fresh process running the same config; a last run finishes.
Its tables and predictions must equal those of an uninterrupted run of the same config.
The kill points are installed by the harness below (pipeline and training-engine
callbacks); production code has no kill hook. The preset is the quick demo with a tiny
LLM so that the ten processes stay cheap.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from respiramfm.config import apply_overrides, from_dict, to_dict
from respiramfm.evaluate.predictions import read_predictions
from respiramfm.pipeline import presets
from respiramfm.pipeline.config import PipelineConfig
from respiramfm.pipeline.recipe import run_pipeline

TINY = ["threads=1", "finetune.model.backbone=tiny-llama",
        "finetune.model.tiny={hidden_size: 64, num_layers: 2, heads: 4}", "finetune.model.num_layers=0",
        "finetune.precision=fp32", "finetune.epochs=1", "finetune.checkpoint_every=3",
        "align.epochs=4", "align.eval_every=2", "align.checkpoint_every=2", "align.figure=false",
        "evaluate.systems=[respiramfm, missing_text, bts_frozen]", "evaluate.n_boot=20",
        "cohort.n_patients=16"]  # a small cohort: the test is about resuming, not about the numbers

# Runs the pipeline with the config in argv[1] and kills itself at the point named in argv[2].
HARNESS = r"""
import json, os, signal, sys
from respiramfm.config import from_dict
from respiramfm.pipeline.config import PipelineConfig
from respiramfm.pipeline.recipe import run_pipeline
from respiramfm.pipeline.stages import PipelineCallback
from respiramfm.training.callbacks import Callback

cfg = from_dict(PipelineConfig, json.loads(sys.argv[1]))
when, _, where = sys.argv[2].partition(":")

def die(*_):
    os.kill(os.getpid(), signal.SIGKILL)

class KillAfterCheckpoint(Callback):
    def on_checkpoint(self, trainer, path):
        die()

class Kill(PipelineCallback):
    def on_stage_end(self, name):
        if when == "end" and name == where:
            die()

    def training_callbacks(self, name):
        return [KillAfterCheckpoint()] if when == "checkpoint" and name == where else []

def log(*parts, **_):
    line = " ".join(map(str, parts))
    print(line, flush=True)
    if when == "predictions" and line.startswith("[evaluate] " + where + " ") and "test predictions ->" in line:
        die()

run_pipeline(cfg, callbacks=[Kill()], log=log)
"""

KILLS = ["end:prepare", "end:embed", "end:embed-text", "end:align", "checkpoint:finetune", "end:finetune",
         "predictions:respiramfm", "end:evaluate"]


def tiny_config(out: Path) -> PipelineConfig:
    cfg = presets.simulated(quick=True, out=str(out))
    return from_dict(PipelineConfig, apply_overrides(to_dict(cfg), TINY), where="test")


def _run(cfg: PipelineConfig, kill: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", HARNESS, json.dumps(to_dict(cfg)), kill], capture_output=True,
                          text=True, timeout=900)


def _tables(out: Path) -> tuple[dict, dict]:
    res = json.loads((out / "evaluate" / "results.json").read_text())
    rows = {(r["task"], r["system"]): (r["auroc_per_seed"], r["n"], r["n_pos"]) for r in res["rows"]}
    preds = {p.parent.name: {(r["task"], r["record_id"]): r["prob"] for r in read_predictions(p)}
             for p in sorted((out / "evaluate" / "predictions").glob("*/seed0.csv"))}
    return rows, preds


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_demo_killed_in_every_stage_finishes_with_the_same_report(tmp_path):
    ref = tiny_config(tmp_path / "reference")
    run_pipeline(ref, log=lambda *a, **k: None)

    cfg = tiny_config(tmp_path / "killed")
    for kill in KILLS:
        proc = _run(cfg, kill)
        assert proc.returncode == -signal.SIGKILL, f"{kill}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    done = _run(cfg, "never:")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    assert "demo finished" in done.stdout

    rows, preds = _tables(Path(cfg.out))
    want_rows, want_preds = _tables(Path(ref.out))
    assert rows.keys() == want_rows.keys() and set(preds) == {"respiramfm", "missing_text", "bts_frozen"}
    for key, (aurocs, n, n_pos) in want_rows.items():
        got = rows[key]
        assert (got[1], got[2]) == (n, n_pos) and got[0].keys() == aurocs.keys()
        assert all(abs(got[0][s] - v) < 1e-6 for s, v in aurocs.items() if v is not None), key
    for system, probs in want_preds.items():
        assert preds[system].keys() == probs.keys()
        assert max(abs(preds[system][k] - p) for k, p in probs.items()) < 1e-5, system
    summary = json.loads((Path(cfg.out) / "demo_summary.json").read_text())
    assert summary["simulated"] is True and (Path(cfg.out) / "report.html").is_file()
    assert (Path(cfg.out) / "model" / "config.json").is_file()
