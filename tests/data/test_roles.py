"""Zero-shot-only datasets never reach a training stage: the rule, `prepare --role`, and each stage's refusal.

Real inputs: the KAUH recordings of ../shared/data prepared by `respiramfm prepare kauh`, and the
stage-2 test cohort of tests/testkit (its FT-Z task is zero-shot on dataset ft_zero).
"""

from __future__ import annotations

import dataclasses

import pytest

from respiramfm.cli import main
from respiramfm.data.merge import merge_manifests
from respiramfm.data.records import read_manifest, write_manifest
from respiramfm.data.roles import (ZeroShotLeakError, as_test_only, refuse_zero_shot_rows, run_tasks,
                                   supervised_datasets, zero_shot_only)
from respiramfm.data.tasks import Task, dump_tasks_yaml, get_task
from respiramfm.encoders.pretrain import PretrainConfig, pretrain, refuse_zero_shot_audio
from respiramfm.errors import DataError
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.evaluate.data import load_eval_data
from respiramfm.fusion.data import load_finetune_data
from testkit.finetune_synth import make_synth


@pytest.fixture(scope="module")
def kauh_default(shared_data, tmp_path_factory):
    """KAUH prepared as a new user would without the role: patients dealt 70/10/20."""
    out = tmp_path_factory.mktemp("kauh") / "kauh.csv"
    assert main(["prepare", "kauh", "--root", str(shared_data / "kauh"), "--out", str(out)]) == 0
    return out


def test_zero_shot_only_follows_the_runs_tasks(tmp_path):
    assert zero_shot_only(run_tasks()) == ["codatb", "coswara", "kauh"]
    assert supervised_datasets(run_tasks()) == ["coughvid", "icbhi", "tbscreen", "ukcovid19"]
    assert zero_shot_only([get_task("T4")]) == []
    # a task file that gives KAUH a supervised task: KAUH is a training dataset of that run
    mine = Task("KAUH-COPD", "kauh", disease="COPD", disease_phrase="COPD", positive=("copd",),
                negative=("healthy",), audio_type="lung", role="supervised", simulated=True)  # kept out of defaults
    dump_tasks_yaml([mine, get_task("T8")], tmp_path / "tasks.yaml")
    assert zero_shot_only(run_tasks([str(tmp_path / "tasks.yaml")])) == []
    # only the task files' tasks (plus named ones) form the run: T7 named explicitly makes KAUH zero-shot-only
    dump_tasks_yaml([get_task("T4")], tmp_path / "t4.yaml")
    assert zero_shot_only(run_tasks([str(tmp_path / "t4.yaml")])) == []
    assert zero_shot_only(run_tasks([str(tmp_path / "t4.yaml")], ["T7"])) == ["kauh"]


def test_refusal_names_stage_dataset_counts_and_the_fix(kauh_default):
    records = read_manifest(kauh_default)
    n_fit = sum(r.split in ("train", "val") for r in records)
    assert 0 < n_fit < len(records) == 30
    with pytest.raises(ZeroShotLeakError) as err:
        refuse_zero_shot_rows(records, run_tasks(), stage="align", path=kauh_default)
    e = err.value
    assert isinstance(e, DataError) and e.stage == "align" and e.counts == {"kauh": n_fit}
    msg = str(e)
    assert msg.startswith(str(kauh_default)) and f"kauh: {n_fit} row(s)" in msg and "T7, T8, T9" in msg
    assert "prepare kauh ... --role zero-shot" in msg and "--zero-shot kauh" in msg
    refuse_zero_shot_rows(as_test_only(records), run_tasks(), stage="align")  # all test: accepted
    refuse_zero_shot_rows(records, [get_task("T4")], stage="align")  # KAUH is not in this run


def test_prepare_role_zero_shot_and_merge_zero_shot_agree(shared_data, kauh_default, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "kauh_zs.csv"
    assert main(["prepare", "kauh", "--root", str(shared_data / "kauh"), "--out", str(out),
                 "--role", "zero-shot"]) == 0
    printed = capsys.readouterr().out
    assert "note:" not in printed
    zs = read_manifest(out)
    assert len(zs) == 30 and {r.split for r in zs} == {"test"}
    assert "role: zero-shot" in (tmp_path / "kauh_zs.csv.report.txt").read_text()
    merged = merge_manifests([kauh_default], tmp_path / "merged.csv", zero_shot=("kauh",))
    assert [dataclasses.replace(r, audio_path="") for r in merged] == [
        dataclasses.replace(r, audio_path="") for r in zs]
    # without the role, prepare says what the training stages will do with those rows
    assert main(["prepare", "kauh", "--root", str(shared_data / "kauh"), "--out", str(tmp_path / "k.csv")]) == 0
    assert "note: kauh serves only zero-shot paper tasks" in capsys.readouterr().out


def test_pretrain_audio_refuses_before_touching_audio(kauh_default, tmp_path):
    cfg = PretrainConfig(manifests=[str(kauh_default)], out_dir=str(tmp_path / "enc"), device="cpu")
    with pytest.raises(ZeroShotLeakError, match="pretrain-audio refuses") as err:
        pretrain(cfg)
    assert err.value.counts["kauh"] == sum(r.split != "test" for r in read_manifest(kauh_default))
    assert not (tmp_path / "enc" / "spec_cache").exists()
    # test rows are excluded by default, so an all-test KAUH is accepted ...
    write_manifest(as_test_only(read_manifest(kauh_default)), tmp_path / "zs.csv")
    refuse_zero_shot_audio(PretrainConfig(manifests=[str(tmp_path / "zs.csv")]))
    # ... unless the run also pretrains on test rows
    with pytest.raises(ZeroShotLeakError, match="test 30"):
        refuse_zero_shot_audio(PretrainConfig(manifests=[str(tmp_path / "zs.csv")], exclude_splits=[]))


@pytest.fixture(scope="module")
def synth_leak(tmp_path_factory):
    """The stage-2 test cohort with two of its zero-shot (ft_zero) records moved to train and val."""
    s = make_synth(tmp_path_factory.mktemp("synth"))
    recs = read_manifest(s.manifest)
    zero = [i for i, r in enumerate(recs) if r.dataset == "ft_zero"]
    recs[zero[0]].split, recs[zero[1]].split = "train", "val"
    write_manifest(recs, s.root / "leak.csv")
    return s


def test_finetune_and_every_baseline_refuse_zero_shot_rows(synth_leak):
    s = synth_leak
    load_finetune_data([str(s.manifest)], [str(s.store)], [], [str(s.tasks)])  # the clean cohort loads
    with pytest.raises(ZeroShotLeakError, match="finetune refuses") as err:
        load_finetune_data([str(s.root / "leak.csv")], [str(s.store)], [], [str(s.tasks)])
    assert err.value.counts == {"ft_zero": 2} and "train 1, val 1" in str(err.value) and "FT-Z" in str(err.value)
    # the evaluation loads every system's data through one function: it refuses too
    cfg = EvaluateConfig(manifests=[str(s.root / "leak.csv")], task_files=[str(s.tasks)],
                         audio_store=[str(s.store)], projector=str(s.projector))
    with pytest.raises(ZeroShotLeakError, match="evaluate refuses"):
        load_eval_data(cfg)
