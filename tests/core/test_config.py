from dataclasses import dataclass, field

from pathlib import Path

import pytest

from respiramfm.config import from_dict, load_config, preset_names, resolve_config, save_config, to_dict
from respiramfm.errors import ConfigError


@dataclass
class Inner:
    lr: float = 1e-3
    sizes: tuple[int, ...] = (2, 2)


@dataclass
class Outer:
    name: str = "x"
    epochs: int = 3
    flag: bool = False
    tasks: list[str] = field(default_factory=lambda: ["T1"])
    inner: Inner = field(default_factory=Inner)
    path: str | None = None


def test_defaults_yaml_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 7\ninner:\n  lr: 0.5\n")
    cfg = load_config(Outer, p, ["inner.sizes=[1,2,3]", "flag=true", "tasks=[T2,T3]", "path=abc"])
    assert cfg.epochs == 7 and cfg.inner.lr == 0.5 and cfg.inner.sizes == (1, 2, 3)
    assert cfg.flag is True and cfg.tasks == ["T2", "T3"] and cfg.path == "abc"
    assert cfg.name == "x"


def test_roundtrip(tmp_path):
    cfg = Outer(epochs=9, inner=Inner(lr=0.25, sizes=(4,)))
    save_config(cfg, tmp_path / "o.yaml")
    assert load_config(Outer, tmp_path / "o.yaml") == cfg
    assert from_dict(Outer, to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["nope=1"], "unknown key"),
        (["inner.nope=1"], "unknown key"),
        (["epochs=abc"], "integer"),
        (["epochs=1.5"], "integer"),
        (["flag=maybe"], "true/false"),
        (["epochs"], "key=value"),
    ],
)
def test_bad_overrides(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(Outer, None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(Outer, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="invalid YAML") as e:
        load_config(Outer, bad)
    assert str(bad) in str(e.value)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(Outer, lst)


def _config_class(stem: str):
    from respiramfm.align.train import AlignConfig
    from respiramfm.encoders.pretrain import PretrainConfig
    from respiramfm.evaluate.protocol import EvaluateConfig
    from respiramfm.fusion.train_config import FinetuneConfig

    for prefix, cls in (("align", AlignConfig), ("evaluate", EvaluateConfig), ("finetune", FinetuneConfig),
                        ("pretrain_audio", PretrainConfig)):
        if stem.startswith(prefix):
            return cls
    raise AssertionError(f"configs/{stem}.yaml has no known config class")


CONFIG_ROOT = Path(__file__).resolve().parents[2] / "configs"
CONFIGS = sorted(CONFIG_ROOT.rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_every_shipped_config_loads_into_its_dataclass(path, tmp_path):
    """Every key of every shipped YAML (presets in configs/NAME/ too) is a real field, and the file round-trips."""
    cls = _config_class(path.stem)
    cfg = load_config(cls, path)
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(cls, tmp_path / "again.yaml") == cfg
    assert {p.parent.name for p in CONFIGS} >= {"configs", "paper", "cpu"} and len(CONFIGS) >= 10


# --- settings presets by name (respiramfm.config.resolve_config) ---

@dataclass
class Stage:
    epochs: int = 1
    lr: float = 0.1


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_a_preset_name_resolves_to_its_stage_file_from_the_working_directory(tmp_path, monkeypatch):
    _tree(tmp_path, {"configs/fast/stage.yaml": "epochs: 3\n", "configs/stage.yaml": "epochs: 5\n"})
    monkeypatch.chdir(tmp_path)
    assert resolve_config("fast", "stage") == tmp_path / "configs" / "fast" / "stage.yaml"
    assert load_config(Stage, "fast", ["lr=0.5"], stage="stage") == Stage(epochs=3, lr=0.5)
    assert load_config(Stage, "ours", stage="stage").epochs == 5          # ours = configs/<stage>.yaml
    assert {"fast", "ours"} <= set(preset_names())
    (tmp_path / "fast").write_text("epochs: 9\n")                         # an existing file wins over a name
    assert load_config(Stage, "fast", stage="stage").epochs == 9
    assert load_config(Stage, None, stage="stage") == Stage()


def test_a_bad_preset_name_is_a_config_error_listing_the_presets(tmp_path, monkeypatch):
    _tree(tmp_path, {"configs/fast/other.yaml": "epochs: 3\n"})
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="'fast' has no stage settings"):
        load_config(Stage, "fast", stage="stage")
    with pytest.raises(ConfigError, match=r"neither a config file nor a settings preset; presets: .*fast"):
        load_config(Stage, "fsat", stage="stage")
    with pytest.raises(ConfigError, match="cannot read config"):  # a path is read as a path
        load_config(Stage, "configs/fast/stage.yaml", stage="stage")


def test_shipped_presets_load_by_name_from_any_directory(tmp_path, monkeypatch):
    from respiramfm.align.train import AlignConfig
    from respiramfm.evaluate.config import EvaluateConfig
    from respiramfm.fusion.train_config import FinetuneConfig

    monkeypatch.chdir(tmp_path)  # no configs/ here: the source checkout's are used
    for name in ("paper", "cpu", "ours"):
        for cls, stage in ((AlignConfig, "align"), (FinetuneConfig, "finetune"), (EvaluateConfig, "evaluate")):
            want = CONFIG_ROOT / (f"{stage}.yaml" if name == "ours" else f"{name}/{stage}.yaml")
            assert resolve_config(name, stage) == want
            assert load_config(cls, name) == load_config(cls, want)
    assert load_config(FinetuneConfig, "paper").optim.lr == 1e-5 and load_config(FinetuneConfig, "cpu").precision == "auto"


def test_an_evaluate_file_without_a_finetune_section_uses_the_finetune_file_beside_it(tmp_path):
    from respiramfm.evaluate.config import EvaluateConfig
    from respiramfm.fusion.train_config import FinetuneConfig

    _tree(tmp_path, {"p/finetune.yaml": "epochs: 7\noptim: {lr: 0.002}\n", "p/evaluate.yaml": "seeds: [4]\n",
                     "q/finetune.yaml": "epochs: 7\n", "q/evaluate.yaml": "finetune: {epochs: 2}\n"})
    ev = load_config(EvaluateConfig, tmp_path / "p" / "evaluate.yaml")
    assert ev.seeds == [4] and ev.finetune == load_config(FinetuneConfig, tmp_path / "p" / "finetune.yaml")
    assert load_config(EvaluateConfig, tmp_path / "q" / "evaluate.yaml").finetune.epochs == 2  # its own section wins
    from respiramfm.evaluate.budget import budget_of, unit_budget

    for name in ("paper", "cpu"):  # so these presets' RespiraMFM training is their stage-2 file, one copy
        assert load_config(EvaluateConfig, name).finetune == load_config(FinetuneConfig, name)
    for name in ("paper", "cpu", "ours"):  # and every trained system of each preset gets that stage 2's budget
        ev, budget = load_config(EvaluateConfig, name), to_dict(budget_of(load_config(FinetuneConfig, name)))
        assert all(to_dict(unit_budget(ev, system).budget) == budget for system in ev.systems), name
