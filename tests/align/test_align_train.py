"""Training loop on in-memory pairs: learning, validation-based selection, early stopping, config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from respiramfm.align.data import AlignData
from respiramfm.models.projector import load_projector
from respiramfm.align.train import AlignConfig, evaluate, train_align
from respiramfm.align.losses import ContrastiveLoss
from respiramfm.config import load_config
from respiramfm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path, **kw) -> AlignConfig:
    cfg = AlignConfig(out_dir=str(tmp_path / "run"), progress=False, figure=False, epochs=10, eval_every=1,
                      checkpoint_every=5, threads=1, patience=0)
    cfg.projector.in_dim, cfg.projector.hidden = 48, 64
    for k, v in kw.items():
        if k.startswith("projector."):
            setattr(cfg.projector, k.split(".", 1)[1], v)
        else:
            setattr(cfg, k, v)
    return cfg


@pytest.fixture(scope="module")
def linear_data(make_pairs) -> AlignData:
    return AlignData(make_pairs(600, seed=0), make_pairs(150, seed=1, offset=10_000))


@pytest.mark.parametrize("loss", ["infonce", "clip", "dup_aware"])
def test_retrieval_far_above_chance_on_a_noisy_linear_map(tmp_path, linear_data, loss):
    res = train_align(_cfg(tmp_path, loss=loss, epochs=15, eval_every=5, **{"projector.final": "layernorm"}),
                      linear_data)
    best, start = res.best_metrics, res.metrics[0]
    assert best["chance_r1"] == pytest.approx(1 / 150) and best["chance_r5"] == pytest.approx(5 / 150)
    assert best["r1"] > 0.5 > 30 * best["chance_r1"] / 2     # > 37x chance
    assert best["r5"] > 0.85
    assert start["r1"] < 0.1                                   # the untrained projector is near chance
    assert best["val_loss"] < start["val_loss"] and best["alignment"] < start["alignment"]
    rows = [json.loads(x) for x in (Path(res.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 5, 10, 15]
    assert {"train_loss", "val_loss", "r1", "r5", "alignment", "uniformity", "scale"} <= set(rows[-1])


def test_official_head_also_learns(tmp_path, linear_data):
    res = train_align(_cfg(tmp_path, epochs=10, eval_every=10, **{"projector.final": "official"}), linear_data)
    assert res.best_metrics["r1"] > 20 * res.best_metrics["chance_r1"]


OVERFIT = dict(lr=1e-2, batch_size=8, loss="infonce", **{"projector.dropout": 0.0, "projector.final": "none"})


@pytest.fixture(scope="module")
def overfit_data(make_pairs) -> AlignData:
    """24 very noisy training pairs: validation loss falls for a few epochs, then rises (overfitting)."""
    return AlignData(make_pairs(24, seed=0, noise=3.0), make_pairs(60, seed=1, noise=3.0, offset=10_000))


def test_best_epoch_is_chosen_on_validation_and_saved(tmp_path, overfit_data):
    data = overfit_data
    cfg = _cfg(tmp_path, epochs=24, eval_every=2, **OVERFIT)
    res = train_align(cfg, data)
    losses = {r["epoch"]: r["val_loss"] for r in res.metrics}
    assert res.best_epoch == min(losses, key=losses.get)
    assert 0 < res.best_epoch < 24 and losses[24] > losses[res.best_epoch]      # selection mattered
    # the saved projector is the one of the best epoch: re-evaluating it reproduces that row
    model, _ = load_projector(res.out_dir)
    order = torch.randperm(60, generator=torch.Generator().manual_seed(1234567))
    again = evaluate(model, ContrastiveLoss(cfg.loss, cfg.tau), data.val, cfg.batch_size, order)
    assert again["val_loss"] == pytest.approx(losses[res.best_epoch], rel=1e-5)
    assert json.loads((Path(res.out_dir) / "projector.json").read_text())["provenance"]["best_epoch"] == res.best_epoch
    # select_metric=last reproduces the official "save the final epoch"
    res_last = train_align(_cfg(tmp_path / "last", epochs=24, eval_every=2, select_metric="last", **OVERFIT), data)
    assert res_last.best_epoch == 24
    assert res_last.metrics == res.metrics                      # selection never changes training
    # r1 selection picks the argmax of R@1 (the earliest on ties)
    res_r1 = train_align(_cfg(tmp_path / "r1", epochs=24, eval_every=2, select_metric="r1", **OVERFIT), data)
    best_r1 = max(r["r1"] for r in res_r1.metrics)
    assert res_r1.best_epoch == min(r["epoch"] for r in res_r1.metrics if r["r1"] == best_r1)


def test_early_stopping_after_patience_evaluations(tmp_path, overfit_data):
    res = train_align(_cfg(tmp_path, epochs=200, patience=3, **OVERFIT), overfit_data)
    assert res.stopped_early and res.last_epoch == res.best_epoch + 3 < 200
    assert json.loads((Path(res.out_dir) / "summary.json").read_text())["stopped_early"] is True


def test_defaults_equal_the_default_config_file():
    assert load_config(AlignConfig, ROOT / "configs" / "align.yaml") == AlignConfig()


def test_training_is_deterministic_and_leaves_the_global_rng_alone(tmp_path, linear_data):
    torch.manual_seed(99)
    before = torch.get_rng_state()
    a = train_align(_cfg(tmp_path / "a", epochs=3), linear_data)
    assert torch.equal(torch.get_rng_state(), before)
    b = train_align(_cfg(tmp_path / "b", epochs=3), linear_data)
    assert a.metrics == b.metrics
    c = train_align(_cfg(tmp_path / "c", epochs=3, seed=1), linear_data)
    assert c.metrics[-1]["val_loss"] != a.metrics[-1]["val_loss"]


def test_dimension_mismatch_is_a_config_error(tmp_path, linear_data):
    with pytest.raises(ConfigError, match="48-d audio"):
        train_align(_cfg(tmp_path, **{"projector.in_dim": 768}), linear_data)
    with pytest.raises(ConfigError, match="32-d text"):
        train_align(_cfg(tmp_path, **{"projector.out_dim": 2560}), linear_data)


def test_config_file_and_overrides(tmp_path):
    cfg = load_config(AlignConfig, ROOT / "configs" / "align.yaml",
                      ["loss=infonce", "projector.final=official", "epochs=7", "datasets=[a,b]", "tau=0.05"])
    got = (cfg.loss, cfg.projector.final, cfg.epochs, cfg.datasets, cfg.tau)
    assert got == ("infonce", "official", 7, ["a", "b"], 0.05)
    base = load_config(AlignConfig, ROOT / "configs" / "align.yaml")
    assert (base.loss, base.projector.final, base.epochs, base.datasets) == ("clip", "layernorm", 500, [])
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(AlignConfig, None, ["projector.activation=relu"])
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(AlignConfig, None, ["batch_size=sixty-four"])
    with pytest.raises(ConfigError, match="loss must be one of"):
        load_config(AlignConfig, None, ["loss=triplet"]).validate()
    with pytest.raises(ConfigError, match="select_metric"):
        load_config(AlignConfig, None, ["select_metric=test_auroc"]).validate()


def test_official_preset_is_the_released_recipe():
    cfg = load_config(AlignConfig, ROOT / "configs" / "paper" / "align.yaml").validate()
    assert (cfg.loss, cfg.tau, cfg.batch_size, cfg.lr, cfg.optimizer, cfg.epochs, cfg.weight_decay) == \
        ("infonce", 0.07, 64, 1e-3, "adam", 500, 0.0)
    p = cfg.projector
    assert (p.kind, p.in_dim, p.hidden, p.dropout, p.final) == ("mlp", None, 1024, 0.1, "official")  # None: the store's
    assert cfg.select_metric == "last" and cfg.patience == 0
