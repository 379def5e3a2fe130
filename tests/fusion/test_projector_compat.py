"""Stage 2 refuses a projector aligned with another LLM, another layer cut or another encoder of the same width.

The projector's record is written the way `respiramfm align` writes it (:func:`projector_compat`
over the real audio store meta and the real text-store meta of a backbone); stage 2 is the real
``build_model`` / ``finetune`` command on the tiny-llama test cohort of tests/testkit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from respiramfm.align.compat import ProjectorMismatchError, check_projector, projector_compat, recorded
from respiramfm.cache.view import EmbeddingStore
from respiramfm.cli import main
from respiramfm.config import load_config
from respiramfm.fusion.data import load_finetune_data
from respiramfm.fusion.train import FinetuneConfig, build_model
from respiramfm.llm.text_store import store_meta
from respiramfm.models.configuration import FusionConfig
from respiramfm.models.fusion import load_configured_backbone
from respiramfm.models.projector import load_projector, save_projector
from testkit.finetune_synth import make_synth

TINY = {"hidden_size": 64, "num_layers": 2, "heads": 4}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    s = make_synth(tmp_path_factory.mktemp("compat"))
    data = load_finetune_data([str(s.manifest)], [str(s.store)], [], [str(s.tasks)])
    return s, data


def _aligned(s, out: Path, *, tiny: dict = TINY, num_layers: int = 0, audio: dict | None = None) -> Path:
    """A projector whose provenance says it was aligned on ``audio`` (default: the cohort's store) and on
    text targets of tiny-llama ``tiny`` cut to ``num_layers``."""
    backbone = load_configured_backbone(FusionConfig(backbone="tiny-llama", tiny=tiny, num_layers=num_layers))
    text_meta = store_meta(backbone, "hidden_mean", 125)
    audio_meta = audio if audio is not None else dict(EmbeddingStore(s.store).meta)
    model, _ = load_projector(s.projector)
    save_projector(model, out, {"stage": "align", "compat": projector_compat(audio_meta, text_meta)})
    return out


def _cfg(s, projector: Path, **extra) -> FinetuneConfig:
    return load_config(FinetuneConfig, None, s.sets(projector=projector, out_dir=projector.parent / "ft", **extra))


def test_matching_projector_builds_and_its_record_reaches_the_saved_model(synth, tmp_path):
    s, data = synth
    proj = _aligned(s, tmp_path / "ok")
    rec = json.loads((proj / "projector.json").read_text())["provenance"]["compat"]
    assert rec["encoder"]["name"] == "synthetic" and rec["encoder"]["dim"] == 16
    assert rec["llm"]["layers"] == "all" and rec["llm"]["num_layers"] == 0 and rec["llm"]["hidden_size"] == 64
    assert rec["text"]["space"] == "hidden_mean" and rec["text"]["store_key"]
    model = build_model(_cfg(s, proj), data, "cpu")
    model.save_pretrained(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "config.json").read_text())["projector"]["provenance"]
    assert saved["compat"] == rec  # what predict/serve can check against their own encoder and LLM


def test_projector_of_another_llm_with_the_same_width_is_refused(synth, tmp_path):
    s, data = synth
    proj = _aligned(s, tmp_path / "other", tiny={**TINY, "seed": 7})
    with pytest.raises(ProjectorMismatchError, match="llm.weights") as err:
        build_model(_cfg(s, proj), data, "cpu")
    assert str(err.value).startswith(str(proj)) and "re-run `respiramfm align`" in str(err.value)


def test_projector_of_another_layer_cut_is_refused_both_ways(synth, tmp_path):
    s, data = synth
    cut = _aligned(s, tmp_path / "cut", num_layers=1)
    assert recorded(json.loads((cut / "projector.json").read_text())["provenance"])["llm"]["num_layers"] == 1
    with pytest.raises(ProjectorMismatchError, match="llm.layers: projector 'first 1 of 2' vs stage 2 'all'"):
        build_model(_cfg(s, cut), data, "cpu")
    full = _aligned(s, tmp_path / "full")
    with pytest.raises(ProjectorMismatchError, match="llm.layers: projector 'all' vs stage 2 'first 1 of 2'"):
        build_model(_cfg(s, full, **{"model.num_layers": 1}), data, "cpu")
    build_model(_cfg(s, cut, **{"model.num_layers": 1}), data, "cpu")  # same cut: accepted


def test_projector_of_another_encoder_with_the_same_width_is_refused(synth, tmp_path, capsys):
    s, data = synth
    other = {**EmbeddingStore(s.store).meta, "encoder": "opera-ct", "weights_hash": "ab" * 32}
    proj = _aligned(s, tmp_path / "enc", audio=other)
    with pytest.raises(ProjectorMismatchError) as err:
        build_model(_cfg(s, proj), data, "cpu")
    fields = [d[0] for d in err.value.differences]
    assert fields == ["encoder.name", "encoder.weights_hash"]
    assert "encoder.name: projector 'opera-ct' vs stage 2 'synthetic'" in str(err.value)
    # the command line says the same and stops before training
    assert main(["finetune", *[a for x in s.sets(projector=proj, out_dir=tmp_path / "cli") for a in ("--set", x)]]) == 1
    assert "encoder.name: projector 'opera-ct'" in capsys.readouterr().err
    assert not (tmp_path / "cli" / "checkpoints").exists()


def test_older_projectors_are_checked_on_what_they_recorded():
    legacy = {"audio_encoder": "logmel-stats", "audio_weights_hash": "x", "text_model": {"weights": "w", "arch": "a"}}
    check_projector({"note": "no record"}, {"encoder": "synthetic"}, {"weights": "w2"}, 64)  # nothing to compare
    check_projector(legacy, {"encoder": "logmel-stats", "weights_hash": "x"}, {"weights": "w", "arch": "a"}, 64)
    with pytest.raises(ProjectorMismatchError, match="encoder.name"):
        check_projector(legacy, {"encoder": "opera-ct", "weights_hash": "x"}, None)
    with pytest.raises(ProjectorMismatchError, match="llm.layers"):  # an uncut record against a cut LLM
        check_projector(legacy, None, {"weights": "w", "arch": "a", "layers": "first 2 of 4"}, 64)
