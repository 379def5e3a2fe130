"""``finetune_run: DIR`` in an evaluate config: the run's saved config is read and checked, never copied by hand."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from respiramfm.config import save_config
from respiramfm.errors import ConfigError
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.evaluate.finetune_run import apply_finetune_run, check_run, run_config
from respiramfm.fusion.train_config import FinetuneConfig


@pytest.fixture
def run(tmp_path):
    d = tmp_path / "ft"
    (d / "model").mkdir(parents=True)
    save_config(FinetuneConfig(manifests=[str(tmp_path / "m.csv")], audio_store=[str(tmp_path / "audio")],
                               projector=str(tmp_path / "align"), tasks=["T4"], seed=0, epochs=7, batch_size=3),
                d / "config.yaml")
    return d


def _data(tmp_path, **kw):
    base = dict(manifests=[str(tmp_path / "m.csv")], task_files=[], audio_store=[str(tmp_path / "audio")],
                supervised=["T4"], projector=str(tmp_path / "align"))
    return SimpleNamespace(**(base | kw))


def test_evaluate_takes_the_runs_settings_and_projector(run, tmp_path):
    cfg = EvaluateConfig(manifests=["m.csv"], audio_store=["a"], text_store="t", finetune_run=str(run), seeds=[0])
    assert cfg.finetune.epochs != 7
    apply_finetune_run(cfg)
    assert (cfg.finetune.epochs, cfg.finetune.batch_size) == (7, 3)  # the shared budget is the run's
    if cfg.stage1_per_seed:
        assert cfg.seed_projectors == {0: str(tmp_path / "align")}


def test_a_run_of_other_data_tasks_or_seed_is_refused(run, tmp_path):
    d, cfg = run_config(str(run), 0)
    check_run(d, cfg, _data(tmp_path), 0)  # the same data: accepted
    with pytest.raises(ConfigError, match=r"tasks: run trained on \['T4'\], evaluate trains on \['T1'\]"):
        check_run(d, cfg, _data(tmp_path, supervised=["T1"]), 0)
    with pytest.raises(ConfigError, match="manifests: run"):
        check_run(d, cfg, _data(tmp_path, manifests=[str(tmp_path / "other.csv")]), 0)
    with pytest.raises(ConfigError, match="seed: run 0 vs evaluate seed 1"):
        check_run(d, cfg, _data(tmp_path), 1)
    with pytest.raises(ConfigError, match="not a finished"):
        run_config(str(tmp_path / "ft{seed}"), 0)
