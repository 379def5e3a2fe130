from dataclasses import dataclass, field

from pathlib import Path

import pytest

from respiramfm.config import from_dict, load_config, save_config, to_dict
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


CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads_into_its_dataclass(path, tmp_path):
    """Every key of every shipped YAML is a real field (a typo would raise), and the file round-trips."""
    cls = _config_class(path.stem)
    cfg = load_config(cls, path)
    save_config(cfg, tmp_path / "again.yaml")
    assert load_config(cls, tmp_path / "again.yaml") == cfg
    assert len(CONFIGS) >= 7
