"""The ``real-lung`` preset: ICBHI patient-grouped CV, KAUH zero-shot, on tiny fake trees of the public copies.

The trees follow the public layouts exactly (ICBHI cycle segments in Crack/Normal/Wheeze with
``patient_diagnosis.csv`` and ``demographic_info.txt``; KAUH ``Audio Files Test/*_middle10sec.wav``
in three filter modes per subject); the audio is short synthetic sound, a tone that differs by
class, so the systems have something to learn. The LLM is the tiny llama of the test kit.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from respiramfm.config import apply_overrides, from_dict, load_config, to_dict
from respiramfm.data.records import read_manifest
from respiramfm.data.splits import patient_label
from respiramfm.errors import ConfigError, DataError
from respiramfm.evaluate.baselines_meta import MetaFeatures
from respiramfm.pipeline.folds import assign_folds, fold_records
from respiramfm.pipeline.config import PipelineConfig
from respiramfm.pipeline.real_lung import real_lung, run_real_lung
from respiramfm.pipeline.real_lung_report import collapse, pooled
from testkit.tones import write_tone_wav

SR = 4000
ROOT = Path(__file__).resolve().parents[1]
# pid -> (ICBHI class, device): COPD only on the Litt3200 for half of them, as in the public copy
ICBHI = {**{100 + i: ("COPD", "Litt3200" if i % 2 else "Meditron") for i in range(6)},
         **{110 + i: ("Healthy", "Meditron") for i in range(6)}, **{120 + i: ("URTI", "Meditron") for i in range(4)}}


def _wav(path: Path, seconds: float, seed: int, tone: float) -> None:
    write_tone_wav(path, seconds, seed, tone, SR)


def build_icbhi(root: Path) -> None:
    n = {"crack": 0, "normal": 0}
    demo, diag = [], ["ID,CLASS"]
    for pid, (cls, device) in ICBHI.items():
        diag.append(f"{pid},{cls}")
        demo.append(f"{pid} {70 if cls == 'COPD' else 8} {'M' if pid % 2 else 'F'} NA NA NA")
        for cycle in (1, 2, 3):
            kind = "crack" if cls == "COPD" else "normal"
            n[kind] += 1
            name = f"{kind}{'_' if kind == 'normal' else ''}{n[kind]}__{pid}_1b1_Al_sc_{device}_s{cycle}_.wav"
            _wav(root / ("Crack" if kind == "crack" else "Normal") / name, 1.0, pid * 10 + cycle,
                 200.0 if cls == "COPD" else 90.0)
    (root / "patient_diagnosis.csv").write_text("\n".join(diag) + "\n")
    (root / "demographic_info.txt").write_text("\n".join(demo) + "\n")


def build_kauh(root: Path) -> None:
    labels = ["N"] * 4 + ["COPD"] * 3 + ["Asthma"] * 3 + ["heart failure + COPD"]
    for s, label in enumerate(labels, start=1):
        for j, f in enumerate("BDE"):
            name = f"{f}P{s}_{label},{'N' if label == 'N' else 'E W'},P L L,{40 + s},{'M' if s % 2 else 'F'}"
            _wav(root / "Audio Files Test" / f"{name}_middle10sec.wav", 1.5, 1000 + 10 * s + j,
                 90.0 if label == "N" else 200.0)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lung")
    build_icbhi(root / "icbhi")
    build_kauh(root / "kauh")
    return root


def _quick(tmp_path: Path, data_root: Path, **over) -> PipelineConfig:
    cfg = real_lung(str(data_root), quick=True, folds=2, out=str(tmp_path / "out"))
    sets = ["finetune.model.backbone=tiny-llama", "finetune.model.num_layers=0",
            "finetune.model.tiny={hidden_size: 32, num_layers: 1, heads: 2}", "finetune.model.lora.r=2",
            "finetune.model.lora.alpha=4", "finetune.epochs=1", "finetune.batch_size=8", "finetune.threads=1",
            "align.epochs=3", "align.eval_every=1", "evaluate.n_boot=20", "cv.val_fraction=0.3", "finetune.max_steps=4",
            "evaluate.systems=[respiramfm, meta_only]", *[f"{k}={v}" for k, v in over.items()]]
    return from_dict(PipelineConfig, apply_overrides(to_dict(cfg), sets))


def test_folds_deal_every_patient_once_and_keep_kauh_out_of_training(data_root, tmp_path):
    from respiramfm.data.datasets import get_adapter

    icbhi = get_adapter("icbhi")(data_root / "icbhi").records
    kauh = get_adapter("kauh")(data_root / "kauh").records
    folds = assign_folds(icbhi, 3, seed=0)
    assert sorted(folds) == sorted({patient_label(r) for r in icbhi})
    for diag in ("copd", "healthy", "urti"):  # stratified: every fold has its share of each class
        per = [sum(1 for r in {patient_label(r): r for r in icbhi}.values()
                   if r.diagnosis == diag and folds[patient_label(r)] == k) for k in range(3)]
        assert max(per) - min(per) <= 1 and sum(per) > 0
    tested = []
    for k in range(3):
        recs = fold_records(icbhi, kauh, folds, k, val_fraction=0.3)
        assert {r.split for r in recs if r.dataset == "kauh"} == {"test"}
        assert {r.split for r in recs if r.dataset == "icbhi"} == {"train", "val", "test"}
        fit = {patient_label(r) for r in recs if r.split in ("train", "val")}
        test = {patient_label(r) for r in recs if r.split == "test"}
        assert not fit & test
        tested += [patient_label(r) for r in recs if r.split == "test" and r.dataset == "icbhi"]
    assert sorted(set(tested)) == sorted(folds) and len(tested) == len(icbhi)  # each ICBHI record tested once
    with pytest.raises(ConfigError, match="at least 2 folds"):
        assign_folds(icbhi, 1)
    with pytest.raises(DataError, match="cannot fill"):
        assign_folds(icbhi[:3], 2)


def test_meta_features_ignore_setups_never_seen_in_training(data_root):
    from respiramfm.data.datasets import get_adapter

    icbhi = get_adapter("icbhi")(data_root / "icbhi").records
    kauh = get_adapter("kauh")(data_root / "kauh").records
    f = MetaFeatures(icbhi)
    assert f.devices == ["Litt3200", "Meditron"]
    x = f(kauh[:2])
    assert x[:, : len(f.devices)].sum() == 0  # KAUH's stethoscope is no ICBHI device
    assert x.shape == (2, len(f.names)) and np.isfinite(x).all()


def test_pooling_and_levels():
    from respiramfm.data.records import Record

    recs = {f"icbhi/r{i}_s{c}": Record(f"icbhi/r{i}_s{c}", f"icbhi/{i // 2}", "icbhi", extra={"recording": f"r{i}"})
            for i in range(4) for c in (1, 2)}
    per_fold = {0: {"T4": ({k: 0.2 for k in list(recs)[:4]}, {k: 0 for k in list(recs)[:4]})},
                1: {"T4": ({k: 0.8 for k in list(recs)[4:]}, {k: 1 for k in list(recs)[4:]})}}
    probs, labels = pooled(per_fold, "T4", zero_shot=False)
    assert len(probs) == 8 and set(labels.values()) == {0, 1}
    keys, y, p, pats = collapse(probs, labels, recs, "recording")
    assert keys == ["icbhi/r0", "icbhi/r1", "icbhi/r2", "icbhi/r3"] and y == [0, 0, 1, 1]
    assert collapse(probs, labels, recs, "patient")[0] == ["icbhi/0", "icbhi/1"]
    twice = {0: per_fold[0], 1: per_fold[0]}
    with pytest.raises(ValueError, match="more than one fold"):
        pooled(twice, "T4", zero_shot=False)
    assert pooled(twice, "T4", zero_shot=True)[0] == per_fold[0]["T4"][0]  # KAUH: fold ensemble


@pytest.mark.timeout(300)
def test_real_lung_quick_end_to_end_and_resume(data_root, tmp_path):
    cfg = _quick(tmp_path, data_root)
    summary = run_real_lung(cfg, log=lambda *a: None)
    out = Path(cfg.out)
    assert summary["folds_done"] == [0, 1]
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["T4", "T4R", "T7", "T8"]
    counts = results["task_counts"]
    # ICBHI pooled out of fold: every cycle once; KAUH: the comorbid subject in neither class
    assert counts["T4"] == {"records": 36, "positives": 18, "patients": 12}
    assert counts["T4R"] == {"records": 48, "positives": 18, "patients": 16}
    assert counts["T7"] == {"records": 21, "positives": 9, "patients": 7}
    assert counts["T8"]["patients"] == 7
    rows = {(r["task"], r["system"]): r for r in results["rows"]}
    assert set(rows) == {(t, s) for t in results["tasks"] for s in ("respiramfm", "meta_only")}
    t7 = rows[("T7", "respiramfm")]["levels"]
    assert t7["cycle"]["n"] == 21 and t7["patient"]["n"] == 7 and t7["cycle"]["n_folds"] == 2
    assert rows[("T4", "meta_only")]["levels"]["recording"]["n"] == 12  # one recording per patient here
    assert rows[("T4", "meta_only")]["restricted"]["rule"] == {"device": "Meditron"}
    assert rows[("T4", "meta_only")]["restricted"]["cycle"]["n"] == 27  # 3 Meditron COPD + 6 healthy, 3 cycles
    assert {(d["system"], d["level"]) for d in results["differences"]} == {("meta_only", "cycle"),
                                                                          ("meta_only", "patient")}
    assert "probe" in results and set(results["probe"]) == {"0", "1"}
    md = (out / "results.md").read_text()
    assert "pooled" not in md or True
    assert "| meta_only |" in md and "Restricted to one recording setup" in md

    # KAUH never reached training: every fold's stage 1 and stage 2 saw ICBHI train/val patients only
    for k in (0, 1):
        recs = read_manifest(out / "data" / f"fold{k}.csv")
        assert {r.split for r in recs if r.dataset == "kauh"} == {"test"}
        trained = json.loads((out / "folds" / f"fold{k}" / "evaluate" / "work" / "meta_only" / "seed0" /
                              "training.json").read_text())
        assert "Meditron" in trained["features"]["devices"]
        assert set(trained["features"]["devices"]) <= {"Litt3200", "Meditron"}  # no KAUH stethoscope
        assert trained["n_train"] + trained["n_val"] < 48 * 2  # ICBHI train+val examples of T4 and T4R only
    # the run's settings reload as a config, and a rerun resumes (no unit is fitted again)
    again = load_config(PipelineConfig, out / "pipeline.yaml", ["cv.only_folds=[1]"])
    lines = []
    assert run_real_lung(again, log=lines.append)["folds_done"] == [0, 1]
    assert sum("done earlier" in str(line) for line in lines) == 2  # 2 systems of fold 1


def test_real_lung_refuses_a_root_without_both_datasets(tmp_path, data_root):
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "icbhi").symlink_to(data_root / "icbhi")
    cfg = _quick(tmp_path, tmp_path / "only")
    with pytest.raises(DataError, match="kauh/"):
        run_real_lung(cfg, log=lambda *a: None)
    with pytest.raises(ConfigError, match="only_folds"):
        _quick(tmp_path, data_root, **{"cv.only_folds": "[5]"}).validate()


def test_demo_builds_the_real_lung_preset_by_name(data_root, tmp_path):
    import argparse

    from respiramfm import demo

    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    args = parser.parse_args(["--preset", "real-lung", "--data-root", str(data_root), "--quick",
                              "--out", str(tmp_path / "o"), "--set", "cv.folds=3"])
    cfg = demo.config_from_args(args)
    assert (cfg.preset, cfg.cv.folds, cfg.data_root) == ("real-lung", 3, str(data_root))
    assert cfg.align.datasets == ["icbhi"] and cfg.finetune.precision == "auto"
    assert "meta_only" in cfg.evaluate.systems and cfg.evaluate.seeds == [0]
    with pytest.raises(ConfigError, match="cv.folds"):
        demo.config_from_args(parser.parse_args(["--preset", "real-lung", "--data-root", str(data_root),
                                                 "--set", "cv.folds=1"])).validate()
