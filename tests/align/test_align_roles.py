"""Which datasets stage 1 aligns on: the run's supervised tasks' datasets, never a zero-shot-only one."""

from __future__ import annotations

import pytest

from respiramfm.align.data import load_align_data
from respiramfm.data.records import read_manifest
from respiramfm.data.roles import ZeroShotLeakError, run_tasks
from respiramfm.data.tasks import Task, dump_tasks_yaml
from respiramfm.errors import DataError


def _task(role: str) -> Task:
    return Task("ROLE-T", "sim_covid_phone", disease="COVID19", disease_phrase="COVID-19", positive=("covid",),
                negative=("healthy",), audio_type="cough", role=role, simulated=True)


def test_default_datasets_come_from_the_supervised_tasks(sim_stores, tmp_path):
    s = sim_stores
    # the cohort's own task file: its supervised tasks name the dataset, which stage 1 says it used
    data = load_align_data(str(s.manifest), str(s.audio_store), str(s.text_store),
                           tasks=run_tasks([str(s.manifest.parent / "tasks.yaml")]))
    assert data.datasets == ["sim_covid_phone"] and data.datasets_from == "supervised tasks"
    fit = [r for r in read_manifest(s.manifest) if r.split in ("train", "val")]
    assert len(data.train) + len(data.val) + sum(x["split"] in ("train", "val") for x in data.skipped) == len(fit)
    # the built-in T1-T9 train on none of the manifest's datasets: refused with the way out, not "every dataset"
    with pytest.raises(DataError, match=r"supervised tasks' datasets \['coughvid', 'icbhi'.*task_files"):
        load_align_data(str(s.manifest), str(s.audio_store), str(s.text_store))
    # an explicit choice still works
    named = load_align_data(str(s.manifest), str(s.audio_store), str(s.text_store), datasets=["sim_covid_phone"])
    assert named.datasets_from == "config" and len(named.train) == len(data.train)


def test_a_zero_shot_only_dataset_is_refused_even_when_named(sim_stores, tmp_path):
    s = sim_stores
    dump_tasks_yaml([_task("zero-shot")], tmp_path / "zs.yaml")
    n = sum(r.split != "test" for r in read_manifest(s.manifest))
    for datasets in ((), ("sim_covid_phone",)):
        with pytest.raises(ZeroShotLeakError, match=f"align refuses.*sim_covid_phone: {n} row") as err:
            load_align_data(str(s.manifest), str(s.audio_store), str(s.text_store), datasets=datasets,
                            tasks=run_tasks([str(tmp_path / "zs.yaml")]))
        assert err.value.counts == {"sim_covid_phone": n}
    dump_tasks_yaml([_task("supervised")], tmp_path / "sup.yaml")
    ok = load_align_data(str(s.manifest), str(s.audio_store), str(s.text_store),
                         tasks=run_tasks([str(tmp_path / "sup.yaml")]))
    assert ok.datasets == ["sim_covid_phone"]
