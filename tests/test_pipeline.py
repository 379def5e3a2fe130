"""The pipeline's typed config, its two presets, the demo's flags and the thread choice (no stage runs here)."""

from __future__ import annotations

import argparse

import pytest
import torch

from respiramfm import demo
from respiramfm.config import load_config, save_config, to_dict
from respiramfm.errors import ConfigError
from respiramfm.pipeline import presets
from respiramfm.pipeline.config import PipelineConfig
from respiramfm.pipeline.layout import PipelineLayout
import respiramfm.pipeline.threads as threads_mod
from respiramfm.pipeline.threads import ENV, choose_threads, detect_threads, gemm_rate, measured_threads


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_demo_flags_pick_and_fill_the_simulated_preset():
    full = demo.config_from_args(_args())
    assert full.preset == "simulated" and full.out == "runs/demo" and full.evaluate.seeds == [0, 1]
    assert full.evaluate.systems == presets.SYSTEMS and full.evaluate.data_efficiency == "bts_frozen"
    assert full.finetune.model.backbone == "smollm2-135m" and full.finetune.model.num_layers == 4
    assert full.finetune.precision == "auto" and full.finetune.model.order == ["audio", "prompt", "context"]
    assert full.encoder.name == "logmel-stats" and not full.encoder.pretrain
    quick = demo.config_from_args(_args("--quick", "--out", "x", "--llm-layers", "0", "--pretrain-encoder",
                                        "--set", "finetune.epochs=1", "--set", "evaluate.seeds=[3]"))
    assert quick.quick and quick.cohort.quick and quick.out == "x" and quick.finetune.model.num_layers == 0
    assert quick.evaluate.systems == presets.QUICK_SYSTEMS and quick.evaluate.data_efficiency == ""
    assert quick.finetune.epochs == 1 and quick.evaluate.seeds == [3] and quick.encoder.pretrain
    assert quick.pretrain.max_steps == 20 and quick.pretrain.encoder.embed_dim == 16
    opera = demo.config_from_args(_args("--opera-checkpoint", "w.safetensors", "--efficiency", "respiramfm"))
    assert (opera.encoder.name, opera.encoder.checkpoint) == ("opera-ct", "w.safetensors")
    assert opera.evaluate.data_efficiency == "respiramfm"
    with pytest.raises(ConfigError, match="llm-layers"):
        demo.config_from_args(_args("--llm-layers", "-1"))
    with pytest.raises(ConfigError, match="unknown key"):
        demo.config_from_args(_args("--set", "finetune.nope=1"))


def test_real_preset_reads_the_repository_configs(tmp_path):
    cfg = demo.config_from_args(_args("--data-root", str(tmp_path), "--opera-checkpoint", "w.safetensors",
                                      "--quick"))
    assert cfg.preset == "real" and cfg.data_root == str(tmp_path) and cfg.encoder.name == "opera-ct"
    assert cfg.finetune.model.backbone == "phi-2" and cfg.finetune.model.num_layers == 0
    assert cfg.finetune.epochs == 2 and cfg.align.epochs == 60
    assert cfg.evaluate.seeds == [0] and cfg.evaluate.systems == ["respiramfm", "bts_frozen"]
    with pytest.raises(ConfigError, match="stage-2 config not found"):
        presets.real(tmp_path, "w.safetensors", finetune_config=str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="data_root"):
        PipelineConfig(preset="real").validate()
    with pytest.raises(ConfigError, match="preset"):
        PipelineConfig(preset="other").validate()


def test_pipeline_config_round_trips_through_yaml(tmp_path):
    cfg = presets.simulated(quick=True, out=str(tmp_path / "o"))
    save_config(cfg, tmp_path / "pipeline.yaml")
    back = load_config(PipelineConfig, tmp_path / "pipeline.yaml")
    assert to_dict(back) == to_dict(cfg)
    again = demo.config_from_args(_args("--config", str(tmp_path / "pipeline.yaml"), "--set", "seed=7"))
    assert again.seed == 7 and again.finetune.model.num_layers == 4
    lay = PipelineLayout(tmp_path / "o")
    assert lay.finetune(0) == tmp_path / "o" / "finetune" / "seed0" and str(lay.finetune()).endswith("seed{seed}")


def test_threads_follow_the_free_cores(monkeypatch):
    assert detect_threads(cores=2, load=0.3) == 2
    assert detect_threads(cores=2, load=1.2) == 1      # another process busy on one of two cores
    assert detect_threads(cores=2, load=6.0) == 1      # never below one
    assert detect_threads(cores=16, load=3.9) == 13
    assert choose_threads(3) == 3
    monkeypatch.setenv(ENV, "2")
    assert choose_threads(0) == 2
    monkeypatch.setenv(ENV, "two")
    with pytest.raises(ConfigError, match=ENV):
        choose_threads(0)
    with pytest.raises(ConfigError):
        choose_threads(-1)


def test_measured_threads_keep_more_only_when_they_are_faster(monkeypatch):
    quiet = {1: 800.0, 2: 1300.0}.__getitem__     # two free cores: two threads ~1.6x
    shared = {1: 830.0, 2: 460.0}.__getitem__     # another process spins on one core
    assert measured_threads(2, quiet) == 2 and measured_threads(2, shared) == 1
    assert measured_threads(2, {1: 800.0, 2: 860.0}.__getitem__) == 1   # under the 10 % gain
    assert measured_threads(1, quiet) == 1
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(threads_mod, "detect_threads", lambda: 2)
    assert choose_threads(0, shared) == 1 and choose_threads(0, quiet) == 2
    # the real measurement returns a positive rate and leaves torch's setting as it was
    before = torch.get_num_threads()
    assert gemm_rate(1, size=64, seconds=0.01) > 0 and torch.get_num_threads() == before


def test_every_seed_aligns_and_the_pipeline_projector_serves_the_first_seed(tmp_path):
    import shutil

    from testkit.finetune_synth import make_synth

    from respiramfm.pipeline.recipe import align_config, evaluate_config, finetune_config
    from respiramfm.pipeline.stages import Inputs

    synth = make_synth(tmp_path / "synth")
    lay = PipelineLayout(tmp_path / "run")
    shutil.copytree(synth.store, lay.audio)
    lay.text.mkdir(parents=True)
    cfg = presets.simulated(quick=False, out=str(lay.root))
    cfg.align.seed = 7  # per seed, the pipeline's own stage 1 is the first seed's, seeded with it
    inputs = Inputs(synth.manifest, [str(synth.tasks)], ["FT-A", "FT-B"], ["FT-A", "FT-B", "FT-Z"])
    acfg = align_config(cfg, lay, inputs.manifest, 1, inputs.task_files, inputs.evaluated)
    assert acfg.seed == cfg.evaluate.seeds[0] == 0 and acfg.out_dir == str(lay.align)
    assert acfg.task_files == [str(synth.tasks)] and acfg.manifest == str(synth.manifest)
    ecfg = evaluate_config(cfg, lay, inputs, finetune_config(cfg, lay, inputs, 1), "", acfg)
    assert ecfg.stage1_per_seed and ecfg.seeds == [0, 1]
    assert ecfg.seed_projectors == {0: str(lay.align)}  # seed 0 is not aligned twice; seed 1 aligns in evaluate
    assert ecfg.align.epochs == cfg.align.epochs and ecfg.align.text_store == str(lay.text)
    cfg.evaluate.stage1_per_seed = False  # the old protocol on request: one projector for every seed
    ecfg = evaluate_config(cfg, lay, inputs, finetune_config(cfg, lay, inputs, 1), "")
    assert not ecfg.stage1_per_seed and not ecfg.seed_projectors and ecfg.projector == str(lay.align)


def test_a_pipeline_that_pretrains_its_encoder_pretrains_and_embeds_once_per_seed(tmp_path):
    from respiramfm.pipeline.recipe import audio_encoder, seed_encoders
    from respiramfm.pipeline.stages import Inputs

    cfg = presets.simulated(quick=False, pretrain_encoder=True, out=str(tmp_path))
    cfg.evaluate.seeds = [0, 1, 2]
    lay = PipelineLayout(tmp_path)
    calls = []

    def stage(name, fn, *args, **kw):  # records what the recipe would run
        calls.append((name, fn, args, kw))
        return ("opera-ct", f"ckpt-{args[-1]}") if fn is audio_encoder else None

    inputs = Inputs(tmp_path / "m.csv", [], [], [])
    stores = seed_encoders(cfg, lay, inputs, 1, stage)
    assert stores == {1: [str(lay.seed_audio(1))], 2: [str(lay.seed_audio(2))]}
    assert [c[0] for c in calls] == ["pretrain-audio seed1", "embed seed1", "pretrain-audio seed2", "embed seed2"]
    assert calls[1][2][1] == lay.seed_audio(1) and calls[1][3]["checkpoint"] == "ckpt-1"
    cfg.encoder.pretrain = False  # a fixed encoder is not retrained
    assert seed_encoders(cfg, lay, inputs, 1, stage) == {}


def test_each_seed_pretrains_its_encoder_with_its_own_seed(tmp_path, monkeypatch):
    from respiramfm.pipeline import recipe
    from respiramfm.pipeline.stages import Inputs

    seen = []
    monkeypatch.setattr(recipe, "pretrain", lambda pcfg, resume: seen.append((pcfg.seed, pcfg.out_dir)) or "w")
    cfg = presets.simulated(quick=True, pretrain_encoder=True, out=str(tmp_path))
    lay = PipelineLayout(tmp_path)
    inputs = Inputs(tmp_path / "m.csv", [], [], [])
    recipe.audio_encoder(cfg, lay, inputs, 1)
    recipe.audio_encoder(cfg, lay, inputs, 1, seed=1)
    assert seen == [(cfg.pretrain.seed, str(lay.encoder)), (cfg.pretrain.seed + 1, str(lay.seed_encoder(1)))]
