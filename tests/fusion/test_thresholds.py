"""Stage 2 chooses each task's decision threshold on validation and records what it trained on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from testkit.finetune_synth import make_synth
from respiramfm.config import load_config
from respiramfm.errors import ConfigError
from respiramfm.evaluate.operating import choose_threshold
from respiramfm.fusion.train import FinetuneConfig, finetune


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("ft_thr"))


@pytest.fixture(scope="module")
def trained(synth):
    cfg = load_config(FinetuneConfig, None, synth.sets(out_dir=synth.root / "run", epochs=1,
                                                       **{"threshold.rule": "sensitivity", "threshold.target": 0.9}))
    return finetune(cfg)


def test_thresholds_are_chosen_on_validation_and_saved(synth, trained):
    from respiramfm.fusion.data import load_finetune_data, prepare_examples, resolved_items
    from respiramfm.fusion.infer import predict_proba
    from respiramfm.models.fusion import RespiraMFM

    model = RespiraMFM.from_pretrained(trained.out_dir / "model")
    assert set(model.thresholds) == {"FT-A", "FT-B"}  # FT-Z is zero-shot: no validation data, no threshold
    data = load_finetune_data([str(synth.manifest)], [str(synth.store)], [], [str(synth.tasks)])
    prep = prepare_examples(model, data.val)
    probs = predict_proba(model, resolved_items(model, prep, range(len(prep))))
    tasks, y = np.asarray(prep.tasks), prep.labels.numpy()
    for task, saved in model.thresholds.items():
        want = choose_threshold(y[tasks == task], probs[tasks == task], "sensitivity", 0.9)
        assert saved["threshold"] == pytest.approx(want["threshold"], abs=1e-6)
        assert saved["rule"] == "sensitivity" and saved["target"] == 0.9 and saved["val_sensitivity"] >= 0.9
        assert saved["n_val"] == int((tasks == task).sum())
    assert trained.best["thresholds"] == json.loads((trained.out_dir / "model" / "config.json").read_text())[
        "thresholds"]


def test_the_model_records_what_it_trained_on(synth, trained):
    info = json.loads((trained.out_dir / "model" / "config.json").read_text())["trained_on"]
    assert info["simulated"] is True and info["tasks_trained"] == ["FT-A", "FT-B"]
    assert "FT-Z" in info["tasks_not_trained"] and "T1" in info["tasks_not_trained"]
    assert set(info["datasets"]) == {"ft_cough", "ft_lung"}  # ft_zero never reached training
    summary = json.loads((trained.out_dir / "summary.json").read_text())
    lung = info["datasets"]["ft_lung"]
    assert lung["simulated"] and lung["train_records"] == summary["examples"]["FT-B"]["train"]
    assert lung["val_records"] == summary["examples"]["FT-B"]["val"] and 0 < lung["train_patients"] <= 24


def test_threshold_config_is_checked():
    assert FinetuneConfig().threshold.rule == "youden"
    with pytest.raises(ConfigError, match="threshold.rule"):
        load_config(FinetuneConfig, None, ["threshold.rule=f1", "model.mode=text_only"]).validate()


def test_only_a_non_default_rule_enters_the_resume_fingerprint():
    """Runs checkpointed before thresholds existed resume under the default rule; another rule is a new run."""
    from respiramfm.fusion.train import _fingerprint

    assert "threshold" not in _fingerprint(FinetuneConfig())
    cfg = load_config(FinetuneConfig, None, ["threshold.rule=sensitivity"])
    assert _fingerprint(cfg)["threshold"] == {"rule": "sensitivity", "target": 0.9}
