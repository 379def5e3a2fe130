"""Settings presets by name (paper, cpu, ours), the paper's settings as docs/paper.md states them, the demo's
pipeline presets, and the docs that describe them (no training here except one tiny two-step finetune)."""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import pytest
import yaml

from respiramfm import cli, demo
from respiramfm.align.train import AlignConfig
from respiramfm.config import load_config, to_dict
from respiramfm.errors import ConfigError
from respiramfm.evaluate.budget import unit_budget
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.fusion.train_config import FinetuneConfig
from respiramfm.pipeline import presets
from respiramfm.pipeline.config import PipelineConfig
from testkit.finetune_synth import make_synth

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CLASSES = {"align": AlignConfig, "finetune": FinetuneConfig, "evaluate": EvaluateConfig}


def _doc(name: str) -> str:
    return " ".join((ROOT / "docs" / name).read_text().split())  # whitespace-normalised


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


# (a phrase of docs/paper.md, stage, config key, the value the paper preset must hold)
PAPER_FACTS = [
    ("audio-to-text InfoNCE only", "align", "loss", "infonce"),
    ("fixed **temperature 0.07**", "align", "tau", 0.07),
    ("**batch 64**", "align", "batch_size", 64),
    ("**Adam lr 1e-3**", "align", "optimizer", "adam"),
    ("**Adam lr 1e-3**", "align", "lr", 1e-3),
    ("**500 epochs**", "align", "epochs", 500),
    ("last epoch saved", "align", "select_metric", "last"),
    ("no validation, last epoch saved", "align", "patience", 0),
    ("Linear 768 to 1024, LayerNorm, ReLU, Dropout 0.1", "align", "projector.hidden", 1024),
    ("Linear 768 to 1024, LayerNorm, ReLU, Dropout 0.1", "align", "projector.dropout", 0.1),
    ("Linear 1024 to 2560, LayerNorm, ReLU", "align", "projector.final", "official"),
    ("Phi-2 sequence classifier", "finetune", "model.backbone", "phi-2"),
    ("The sequence is [prompt, context, one audio token]", "finetune", "model.order", ["prompt", "context", "audio"]),
    ("The sequence is [prompt, context, one audio token]", "finetune", "model.n_audio_tokens", 1),
    ("truncated to **125 tokens**", "finetune", "model.max_context_tokens", 125),
    ("LoRA r 16, alpha 32, dropout 0.1", "finetune", "model.lora.r", 16),
    ("LoRA r 16, alpha 32, dropout 0.1", "finetune", "model.lora.alpha", 32),
    ("LoRA r 16, alpha 32, dropout 0.1", "finetune", "model.lora.dropout", 0.1),
    ("LoRA r 16, alpha 32, dropout 0.1 on q/k/v/o projections", "finetune", "model.lora.target_modules",
     ["q_proj", "k_proj", "v_proj", "o_proj"]),
    ("**AdamW lr 1e-5**", "finetune", "optim.optimizer", "adamw"),
    ("**AdamW lr 1e-5**", "finetune", "optim.lr", 1e-5),
    ("betas (0.9, 0.95)", "finetune", "optim.betas", [0.9, 0.95]),
    ("eps 1e-8", "finetune", "optim.eps", 1e-8),
    ("**weight decay 0.1**", "finetune", "optim.weight_decay", 0.1),
    ("cosine schedule (T_max 10000, eta_min 1e-6) stepped once per epoch", "finetune", "optim.schedule", "official"),
    ("cosine schedule (T_max 10000, eta_min 1e-6)", "finetune", "optim.t_max", 10000),
    ("cosine schedule (T_max 10000, eta_min 1e-6)", "finetune", "optim.min_lr", 1e-6),
    ("**20 epochs**", "finetune", "epochs", 20),
    ("batch 4 in the config and 16 in the paper", "finetune", "batch_size", 16),
    ("**seed 420**", "finetune", "seed", 420),
    ("concatenates UK COVID-19, Coughvid, TBscreen and ICBHI without task balancing", "finetune", "mixing", "concat"),
    ("mean of three runs", "evaluate", "seeds", [0, 1, 2]),
]


@pytest.mark.parametrize("phrase, stage, key, value", PAPER_FACTS, ids=lambda x: x if isinstance(x, str) else "")
def test_the_paper_preset_holds_what_docs_paper_states(phrase, stage, key, value):
    """A drift in either the configs/paper/ files or docs/paper.md fails here."""
    assert phrase in _doc("paper.md")
    assert _get(load_config(CLASSES[stage], "paper"), key) == value


def test_the_paper_preset_has_exactly_one_deliberate_change_and_is_labelled():
    ft = load_config(FinetuneConfig, "paper")
    # selection on validation at every epoch end over all 20 epochs: the released code picked the epoch on test
    assert (ft.select_metric, ft.eval_every, ft.patience) == ("auroc", 0, 0)
    # nothing else of ours: no warm-up, no clipping, no task/length grouping, every layer, fp32
    assert (ft.optim.warmup_steps, ft.optim.max_grad_norm, ft.group_by_task, ft.group_by_length) == (0, 0.0, False, False)
    assert (ft.model.num_layers, ft.model.lora.top_layers, ft.precision, ft.trunk_cache) == (0, 0, "fp32", False)
    ev = load_config(EvaluateConfig, "paper")
    assert ev.finetune == ft and ev.budget is None  # every system trains with the paper's stage-2 budget
    for system in ev.systems:
        b = unit_budget(ev, system).budget
        assert (b.optim.optimizer, b.optim.lr, b.optim.weight_decay, b.optim.schedule, b.epochs, b.batch_size,
                b.patience) == ("adamw", 1e-5, 0.1, "official", 20, 16, 0), system
    for stage in CLASSES:
        text = (CONFIGS / "paper" / f"{stage}.yaml").read_text()
        assert text.startswith("# THE PAPER'S SETTINGS") and "docs/settings.md" in text
    assert "ONE deliberate change" in (CONFIGS / "paper" / "finetune.yaml").read_text()
    assert not list(CONFIGS.glob("*official*.yaml"))  # one copy: the former *_official.yaml live in configs/paper/


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v and k not in ("systems_options",):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


BOOKKEEPING = ("out_dir", "checkpoint_every", "progress", "log_every", "eval_batch_size")


@pytest.mark.parametrize("other", ["ours", "cpu"])
def test_every_way_ours_and_cpu_differ_from_the_paper_is_in_docs_settings(other):
    settings = (ROOT / "docs" / "settings.md").read_text()
    missing = []
    for stage, cls in CLASSES.items():
        paper, mine = _flat(to_dict(load_config(cls, "paper"))), _flat(to_dict(load_config(cls, other)))
        for key in sorted(paper):
            if paper[key] != mine.get(key) and key.split(".")[-1] not in BOOKKEEPING \
                    and not key.startswith(("finetune.", "align.")):  # evaluate's = the stage files, checked there
                if f"`{key}`" not in settings and f"`{key}`," not in settings:
                    missing.append(f"{stage}: {key}")
    assert not missing, f"docs/settings.md does not list {missing}"


def test_ours_and_cpu_are_labelled_as_ours():
    for path in [CONFIGS / f"{s}.yaml" for s in CLASSES]:
        assert path.read_text().startswith("# OUR RECOMMENDED SETTINGS"), path
    for path in sorted((CONFIGS / "cpu").glob("*.yaml")):
        assert path.read_text().startswith("# CPU PRESET (our"), path
    for path in [CONFIGS / f"{s}.yaml" for s in CLASSES] + sorted((CONFIGS / "cpu").glob("*.yaml")):
        head = " ".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        assert "docs/settings.md" in head and "official" not in path.name, path


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    demo.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_demo_with_data_root_uses_the_paper_settings(tmp_path):
    cfg = demo.config_from_args(_args("--data-root", str(tmp_path), "--opera-checkpoint", "w.safetensors"))
    assert cfg.preset == "real"
    assert cfg.finetune == load_config(FinetuneConfig, "paper") and cfg.align == load_config(AlignConfig, "paper")
    assert cfg.evaluate.seeds == [0, 1, 2] and cfg.evaluate.finetune == cfg.finetune
    ours = demo.config_from_args(_args("--data-root", str(tmp_path), "--settings", "ours"))
    assert ours.finetune == load_config(FinetuneConfig, "ours") and ours.align.loss == "clip"
    cpu = demo.config_from_args(_args("--preset", "real", "--data-root", str(tmp_path), "--settings", "cpu",
                                      "--backbone", "tiny-llama", "--llm-layers", "0"))
    assert cpu.finetune.model.order == ["audio", "prompt", "context"] and cpu.finetune.precision == "auto"
    assert (cpu.finetune.model.backbone, cpu.finetune.model.num_layers) == ("tiny-llama", 0)


def test_the_demo_reads_its_cpu_settings_from_the_yaml(tmp_path, monkeypatch):
    """The demo's stage 2 is defined once, in configs/cpu/finetune.yaml: editing the file changes the demo."""
    default = demo.config_from_args(_args())
    assert default.finetune == load_config(FinetuneConfig, "cpu") and default.align == load_config(AlignConfig, "cpu")
    shutil.copytree(CONFIGS / "cpu", tmp_path / "configs" / "cpu")
    edited = yaml.safe_load((tmp_path / "configs" / "cpu" / "finetune.yaml").read_text())
    edited["optim"]["lr"] = 0.00123
    (tmp_path / "configs" / "cpu" / "finetune.yaml").write_text(yaml.safe_dump(edited))
    monkeypatch.chdir(tmp_path)
    assert demo.config_from_args(_args()).finetune.optim.lr == 0.00123
    (tmp_path / "configs" / "cpu" / "align.yaml").unlink()
    monkeypatch.setattr("respiramfm.config.SOURCE_CONFIGS", tmp_path / "configs")  # as in an installed copy
    with pytest.raises(ConfigError, match="'cpu' has no align settings"):  # never a silent fall-back to defaults
        demo.config_from_args(_args())


def test_pipeline_presets_are_a_registry(tmp_path, monkeypatch):
    seen = {}

    def build(options: presets.PresetOptions) -> PipelineConfig:
        seen["options"] = options
        return presets.real(options.data_root, None, settings=options.settings, out=options.out)

    monkeypatch.setitem(presets.PIPELINE_PRESETS, "lungs", presets.PipelinePreset(
        "lungs", build, settings="cpu", needs_data_root=True, help="test preset"))
    cfg = demo.config_from_args(_args("--preset", "lungs", "--data-root", str(tmp_path), "--out", "o"))
    assert seen["options"].settings == "cpu" and cfg.finetune.precision == "auto" and cfg.out == "o"
    with pytest.raises(ConfigError, match="unknown pipeline preset 'nope'; presets: .*real.*simulated"):
        demo.config_from_args(_args("--preset", "nope"))
    with pytest.raises(ConfigError, match="'lungs' needs --data-root"):
        demo.config_from_args(_args("--preset", "lungs"))
    with pytest.raises(ConfigError, match="'simulated' reads no --data-root"):
        demo.config_from_args(_args("--preset", "simulated", "--data-root", str(tmp_path)))
    with pytest.raises(ConfigError, match="neither a config file nor a settings preset"):
        demo.config_from_args(_args("--settings", "gpu"))


def test_finetune_runs_with_a_preset_name_from_any_directory(tmp_path, monkeypatch):
    synth = make_synth(tmp_path / "data")
    work = tmp_path / "elsewhere"
    work.mkdir()
    monkeypatch.chdir(work)  # no configs/ here
    sets = [s for s in synth.sets(out_dir=work / "run", max_steps=2, epochs=1) if not s.startswith("optim.lr=")]
    argv = ["finetune", "--config", "cpu", "--set", *sets, "model.num_layers=0"]
    assert cli.main(argv) == 0
    saved = load_config(FinetuneConfig, work / "run" / "config.yaml")
    cpu = load_config(FinetuneConfig, "cpu")
    assert saved.model.order == cpu.model.order == ["audio", "prompt", "context"]
    assert (saved.precision, saved.optim.lr, saved.optim.warmup_steps) == ("auto", cpu.optim.lr, 5)
    assert cli.main(["finetune", "--config", "nope"]) == 1


def test_docs_point_to_what_exists_and_say_which_settings_are_whose():
    readme = (ROOT / "README.md").read_text()
    assert "docs/settings.md" in readme and "settings.md" in (ROOT / "docs" / "paper.md").read_text()
    flat = " ".join(readme.split())
    assert "paper configuration" not in flat  # it named configs/finetune.yaml, our settings
    for line in readme.splitlines():  # our configs are never called the paper's
        if re.search(r"configs/(align|finetune|evaluate)\.yaml", line):
            assert "paper's settings" not in line, line
    row10 = next(line for line in (ROOT / "docs" / "defects.md").read_text().splitlines() if line.startswith("| 10 |"))
    assert "README" not in row10 and "docs/settings.md" in row10  # the README never had that note
    assert "text target space" in (ROOT / "docs" / "settings.md").read_text()
    stage1 = next(line for line in readme.splitlines() if line.startswith("| stage 1 |"))
    assert AlignConfig().loss == load_config(AlignConfig, "ours").loss == "clip" and "CLIP" in stage1
    # the demo's docstring names the loss each of its settings presets really uses
    doc = " ".join(demo.__doc__.split())
    assert load_config(AlignConfig, "cpu").loss == "clip" and "symmetric CLIP loss" in doc
    assert load_config(AlignConfig, "paper").loss == "infonce" and "one-way InfoNCE" in doc
