"""`respiramfm demo --data-root`: the real-data preset of the pipeline end to end on a publisher-layout tree.

The real subsets in ../shared/data are too small to train on (ICBHI: 10 recordings of
4 patients; KAUH: 30 recordings, one per patient), so the tree is synthetic: short
WAVs and metadata files named exactly as the ICBHI and KAUH publishers name theirs
(the official ICBHI txt files, ``audio_and_txt_files/{pid}_{idx}_{loc}_sc_{device}``,
KAUH's ``AudioFiles/BP{n}_{diagnosis},{sounds},{location},{age},{sex}.wav``). The
encoder is the tiny OPERA-CT fixture; the LLM is SmolLM2-135M cut to one layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from respiramfm.config import apply_overrides, from_dict, to_dict
from respiramfm.errors import ConfigError, DataError
from respiramfm.pipeline import presets
from respiramfm.pipeline.config import PipelineConfig
from respiramfm.pipeline.recipe import run_pipeline

ROOT = Path(__file__).resolve().parents[1]
SR = 4000


def _wav(path: Path, seconds: float, seed: int, tone: float) -> None:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    y = 0.1 * rng.standard_normal(t.size) + 0.2 * np.sin(2 * np.pi * tone * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 0.3 * t))
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, y.astype(np.float32), SR, subtype="PCM_16")


def _icbhi(root: Path) -> None:
    """12 COPD + 12 healthy patients (8 + 8 official train, 4 + 4 test), one or two recordings each."""
    audio = root / "audio_and_txt_files"
    diag, demo, split = [], [], []
    for i in range(24):
        pid, copd = 101 + i, i % 2 == 0
        diag.append(f"{pid}\t{'COPD' if copd else 'Healthy'}")
        demo.append(f"{pid} {70 - i if copd else 30 + i} {'M' if i % 3 else 'F'} {22 + i % 5}.0 NA NA")
        for j, loc in enumerate(("Al", "Pr")[: 1 + i % 2]):
            name = f"{pid}_{j + 1}b1_{loc}_sc_{'Litt3200' if i % 4 < 2 else 'Meditron'}"
            split.append(f"{name}\t{'train' if i < 16 else 'test'}")
            _wav(audio / f"{name}.wav", 2.5, seed=pid * 10 + j, tone=180.0 if copd else 90.0)
            (audio / f"{name}.txt").write_text("0.1\t1.2\t0\t0\n1.2\t2.4\t1\t0\n")
    (root / "ICBHI_Challenge_diagnosis.txt").write_text("\n".join(diag) + "\n")
    (root / "ICBHI_Challenge_demographic_information.txt").write_text("\n".join(demo) + "\n")
    (root / "ICBHI_challenge_train_test.txt").write_text("\r\n".join(split) + "\r\n")


def _kauh(root: Path) -> None:
    """One file per subject: 10 healthy and 5 each of COPD, asthma and pneumonia (plus a comorbid one)."""
    labels = ["N"] * 10 + ["COPD"] * 5 + ["Asthma"] * 5 + ["pneumonia"] * 5 + ["Heart Failure + COPD"]
    for n, label in enumerate(labels, start=1):
        name = f"BP{n}_{label},{'N' if label == 'N' else 'I E W'},P L L,{30 + 2 * n},{'M' if n % 2 else 'F'}.wav"
        _wav(root / "AudioFiles" / name, 3.0, seed=1000 + n, tone=90.0 if label == "N" else 180.0)


def _config(tmp_path: Path, data_root: Path, checkpoint) -> PipelineConfig:
    cfg = presets.real(data_root, checkpoint, quick=True, seed=0, backbone="smollm2-135m", llm_layers=1,
                       finetune_config=str(ROOT / "configs" / "finetune.yaml"), out=str(tmp_path / "out"))
    return from_dict(PipelineConfig, apply_overrides(to_dict(cfg), [
        "finetune.batch_size=8", "finetune.eval_every=0", "finetune.patience=0", "finetune.optim.warmup_steps=1",
        "finetune.threads=2", "align.epochs=20", "align.figure=false", "evaluate.n_boot=50",
        "evaluate.systems=[respiramfm, bts_frozen]"]))


@pytest.fixture(scope="module")
def publisher_tree(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("real_root")
    _icbhi(root / "icbhi")
    _kauh(root / "kauh")
    return root


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_real_data_demo_end_to_end(tmp_path, publisher_tree, opera_fixtures, capsys, smollm2):
    ckpt = opera_fixtures / "opera_ct_tiny_seed0.safetensors"
    cfg = _config(tmp_path, publisher_tree, str(ckpt))
    run_pipeline(cfg)
    out = Path(cfg.out)
    printed = capsys.readouterr().out
    assert "found icbhi, kauh" in printed and "T3 skipped" in printed and "every kauh patient" in printed

    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["simulated"] is False
    assert summary["datasets"] == ["icbhi", "kauh"]
    assert summary["tasks"]["trained"] == ["T4"]
    assert summary["tasks"]["evaluated"] == ["T4", "T7", "T8", "T9"]
    assert set(summary["tasks"]["skipped"]) == {"T1", "T2", "T3", "T5", "T6"}
    assert {"prepare-icbhi", "prepare-kauh", "embed", "embed-text", "align", "finetune", "evaluate"} <= set(
        summary["seconds"])

    # one manifest of both datasets, audio paths valid relative to it
    from respiramfm.data.records import read_manifest, resolve_audio_path

    records = read_manifest(out / "data" / "manifest.csv")
    assert {r.dataset for r in records} == {"icbhi", "kauh"}
    assert all(resolve_audio_path(r, out / "data").is_file() for r in records)
    # KAUH feeds only zero-shot tasks: all of it is test data, as in the paper's T7 (the whole dataset)
    assert {r.split for r in records if r.dataset == "kauh"} == {"test"}
    assert {r.split for r in records if r.dataset == "icbhi"} == {"train", "val", "test"}

    assert (out / "model" / "config.json").is_file() and (out / "model" / "head.safetensors").is_file()
    saved = json.loads((out / "model" / "config.json").read_text())
    assert "first 1 of" in json.dumps(saved)  # the one-layer cut of the LLM is recorded

    page = (out / "report.html").read_text()
    assert "T4" in page and "T7" in page and "SIMULATED" not in page
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert results["simulated"] is False and results["systems"] == ["respiramfm", "bts_frozen"]
    assert {r["task"] for r in results["rows"]} == {"T4", "T7", "T8", "T9"}
    assert all(not r["simulated"] for r in results["rows"])
    assert "SIMULATED" not in (out / "evaluate" / "results.md").read_text()
    t4 = next(r for r in results["rows"] if r["task"] == "T4" and r["system"] == "respiramfm")
    assert (t4["n"], t4["n_pos"]) == (12, 4)  # the official test patients: 4 COPD (1 recording), 4 healthy (2)
    t7 = next(r for r in results["rows"] if r["task"] == "T7" and r["system"] == "respiramfm")
    assert (t7["n"], t7["n_pos"]) == (15, 5)  # 5 COPD + 10 healthy; the comorbid subject is in neither class
    # the evaluation reused the finetune stage's run for seed 0 instead of training again
    work = out / "evaluate" / "work" / "respiramfm"  # holds only the unit's budget record, no training run
    assert sorted(p.relative_to(work).as_posix() for p in work.rglob("*") if p.is_file()) == ["seed0/budget.json"]


def test_real_data_needs_an_opera_checkpoint_and_usable_datasets(tmp_path, publisher_tree, opera_fixtures):
    cfg = _config(tmp_path, publisher_tree, None)
    with pytest.raises(ConfigError, match="OPERA-CT checkpoint"):
        run_pipeline(cfg)
    assert not Path(cfg.out).exists()
    cfg.encoder.checkpoint = str(tmp_path / "missing.safetensors")
    with pytest.raises(ConfigError, match="not found"):
        run_pipeline(cfg)

    cfg.encoder.checkpoint = str(opera_fixtures / "opera_ct_tiny_seed0.safetensors")
    cfg.data_root = str(tmp_path / "empty")
    Path(cfg.data_root).mkdir()
    with pytest.raises(DataError, match="no dataset folder found"):
        run_pipeline(cfg)
    # KAUH alone feeds only the zero-shot tasks: refused before any embedding or training
    (tmp_path / "kauh_only").mkdir()
    (tmp_path / "kauh_only" / "kauh").symlink_to(publisher_tree / "kauh")
    cfg.data_root = str(tmp_path / "kauh_only")
    with pytest.raises(DataError, match="supervised paper task"):
        run_pipeline(cfg)
    assert not (Path(cfg.out) / "audio_emb").exists()
