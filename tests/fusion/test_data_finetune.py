"""Stage-2 data: test rows never loaded, skipped records reported, cached inputs, batch plans."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from testkit.finetune_synth import IN_DIM, make_synth
from respiramfm.data.records import read_manifest, write_manifest
from respiramfm.errors import ConfigError, DataError
from respiramfm.fusion.data import (default_tasks, load_finetune_data, micro_batches, plan_epoch, prepare_examples,
                                    resolved_items)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("ft_data"), drop=("ft_cough-train-003",))


def load(s, **kw):
    return load_finetune_data([str(s.manifest)], [str(s.store)], kw.pop("tasks", []), [str(s.tasks)], **kw)


def test_examples_hold_train_and_val_only(synth):
    data = load(synth)
    assert set(data.tasks) == {"FT-A", "FT-B"}  # default: the supervised tasks of the task file (not FT-Z)
    ids = {e.record_id for part in (data.train, data.val) for e in part.examples}
    assert not any("-test-" in i for i in ids) and not any(i.startswith("ft_zero") for i in ids)
    assert {e.record_id.split("-")[1] for e in data.train.examples} == {"train"}
    assert {e.record_id.split("-")[1] for e in data.val.examples} == {"val"}
    assert len(data.train) == 24 + 23 and len(data.val) == 16
    # the record without an embedding is reported, not silently lost
    assert data.skipped == [{"record_id": "ft_cough-train-003", "split": "train", "task": "FT-A",
                             "reason": "no audio embedding in store"}]
    assert data.train.audio.shape == (47, IN_DIM) and data.simulated
    labels = {e.record_id: e.label for e in data.train.examples}
    recs = {r.record_id: r for r in read_manifest(synth.manifest)}
    assert all(labels[i] == int(recs[i].diagnosis in ("covid", "copd")) for i in labels)
    assert all(e.context and "nan" not in e.context for e in data.train.examples)


def test_test_rows_can_be_garbage(synth, tmp_path):
    """Test rows are dropped before anything reads their content (only their split column is checked)."""
    recs = read_manifest(synth.manifest)
    changed = [dataclasses.replace(r, diagnosis="covid" if r.diagnosis == "healthy" else "healthy",
                                   symptoms="unknown thing") if r.split == "test" else r for r in recs]
    write_manifest(changed, tmp_path / "m.csv")
    a, b = load(synth), load_finetune_data([str(tmp_path / "m.csv")], [str(synth.store)], [], [str(synth.tasks)])
    assert a.fingerprint() == b.fingerprint()


def test_patient_leakage_and_missing_tasks_are_errors(synth, tmp_path):
    recs = read_manifest(synth.manifest)
    leak = recs + [dataclasses.replace(recs[0], record_id="dup", split="test")]
    write_manifest(leak, tmp_path / "leak.csv")
    with pytest.raises(DataError, match="more than one split"):
        load_finetune_data([str(tmp_path / "leak.csv")], [str(synth.store)], [], [str(synth.tasks)])
    with pytest.raises(DataError, match="no usable training"):
        load(synth, tasks=["FT-A", "FT-Z"])  # FT-Z is test-only
    with pytest.raises(ConfigError, match="audio store"):
        load_finetune_data([str(synth.manifest)], [], [], [str(synth.tasks)])
    with pytest.raises(DataError, match="appears in"):
        load_finetune_data([str(synth.manifest)] * 2, [str(synth.store)], [], [str(synth.tasks)])


def test_validation_is_carved_from_training_patients_when_absent(synth, tmp_path):
    recs = [dataclasses.replace(r, split="train") if r.split == "val" else r for r in read_manifest(synth.manifest)]
    write_manifest(recs, tmp_path / "noval.csv")
    data = load_finetune_data([str(tmp_path / "noval.csv")], [str(synth.store)], [], [str(synth.tasks)],
                              val_fraction=0.25)
    assert data.val_source == "carved" and len(data.val) > 0
    train_p = {e.patient for e in data.train.examples}
    assert not train_p & {e.patient for e in data.val.examples}
    assert not any("-test-" in e.record_id for e in data.train.examples + data.val.examples)


def test_default_tasks_are_the_supervised_ones():
    assert default_tasks([]) == ["T1", "T2", "T3", "T4"]


def test_prepared_inputs_are_computed_once(synth):
    from test_infer_prefix import make_model

    model = make_model("llama")
    data = load(synth)
    prep = prepare_examples(model, data.train)
    assert len(prep) == len(data.train)
    # one tuple object per distinct prompt (FT-A cough, FT-B lung), shared by every example
    assert len({id(p) for p in prep.prompts}) == 2
    e0 = data.train.examples[0]
    assert list(prep.prompts[0]) == model.prompt_ids(e0.task, e0.audio_type)
    assert list(prep.contexts[0]) == model.tokenize_context(e0.context)
    expected = model.project_audio(torch.from_numpy(data.train.audio).unsqueeze(1))
    torch.testing.assert_close(prep.audio, expected)
    assert prep.lengths[0] == len(prep.prompts[0]) + len(prep.contexts[0]) + 1
    # cached items give exactly the logits of the model's own path from text and encoder vectors
    from respiramfm.fusion.infer import plain_logits
    from respiramfm.models.sequence import FusionItem

    idx = [0, 5, 30, 40]
    items = [FusionItem(task=data.train.examples[i].task, audio=data.train.audio[data.train.examples[i].row],
                        context=data.train.examples[i].context, audio_type=data.train.examples[i].audio_type)
             for i in idx]
    with torch.no_grad():
        torch.testing.assert_close(plain_logits(model, resolved_items(model, prep, idx)), model(model.collate(items)),
                                   atol=1e-5, rtol=1e-5)


def _plan_inputs(n_a=37, n_b=23, seed=0):
    rng = np.random.default_rng(seed)
    tasks = ["A"] * n_a + ["B"] * n_b
    return tasks, rng.integers(20, 90, size=n_a + n_b)


def test_concat_plan_covers_every_example_once_in_task_homogeneous_batches():
    tasks, lengths = _plan_inputs()
    plan = plan_epoch(tasks, lengths, 4, "concat", seed=1, epoch=0)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(len(tasks)))
    assert all(len({tasks[i] for i in b}) == 1 for b in plan)
    assert [b.tolist() for b in plan] == [b.tolist() for b in plan_epoch(tasks, lengths, 4, "concat", 1, 0)]
    assert [b.tolist() for b in plan] != [b.tolist() for b in plan_epoch(tasks, lengths, 4, "concat", 1, 1)]
    # length grouping: far less padding than random batches of the same size
    grouped = sum(len(b) * lengths[b].max() - lengths[b].sum() for b in plan)
    rnd = plan_epoch(tasks, lengths, 4, "concat", 1, 0, group_by_length=False)
    assert grouped < 0.5 * sum(len(b) * lengths[b].max() - lengths[b].sum() for b in rnd)
    mixed = plan_epoch(tasks, lengths, 4, "concat", 1, 0, group_by_task=False)
    assert sorted(np.concatenate(mixed).tolist()) == list(range(len(tasks)))
    assert any(len({tasks[i] for i in b}) == 2 for b in mixed)


def test_small_step_batches_are_dropped():
    tasks, lengths = _plan_inputs(9, 5)
    plan = plan_epoch(tasks, lengths, 4, "concat", 0, 0, min_size=2)
    assert min(len(b) for b in plan) >= 2 and len(np.concatenate(plan)) == 12  # each task's trailing 1 dropped


def test_proportional_and_balanced_mixing():
    tasks, lengths = _plan_inputs(60, 12)
    prop = plan_epoch(tasks, lengths, 4, "proportional", 3, 0)
    n_a = sum(tasks[b[0]] == "A" for b in prop)
    n_b = len(prop) - n_a
    assert n_a == 15 or n_b == 3  # the epoch ended when the first task ran out
    assert all(len({tasks[i] for i in b}) == 1 for b in prop)
    bal = plan_epoch(tasks, lengths, 4, "balanced", 3, 0)
    assert len(bal) == 18  # as many steps as concat
    n_b = sum(tasks[b[0]] == "B" for b in bal)
    assert 4 <= n_b <= 14  # about half the steps, far above B's 3/18 share under concat
    with pytest.raises(ConfigError):
        plan_epoch(tasks, lengths, 4, "balanced", 3, 0, group_by_task=False)
    with pytest.raises(ConfigError):
        plan_epoch(tasks, lengths, 4, "roundrobin", 3, 0)


def test_micro_batches_partition_a_step_batch():
    batch = np.arange(11)
    world, accum = 2, 3
    parts = [micro_batches(batch, world, accum, r) for r in range(world)]
    flat = sorted(int(i) for r in parts for m in r for i in m)
    assert flat == list(range(11))
    assert all(len(m) >= 1 for r in parts for m in r)
    assert not set(np.concatenate(parts[0]).tolist()) & set(np.concatenate(parts[1]).tolist())
