"""Every long command takes ``--threads`` and ``--no-progress``; with bars off, logs still get progress lines."""

from __future__ import annotations

import argparse
import importlib
from types import SimpleNamespace

import pytest
import torch

from respiramfm.cli import COMMANDS
from respiramfm.errors import ConfigError
from respiramfm.training.callbacks import Progress
from respiramfm.utils.progress import LineProgress, apply_threads_flag, progress


@pytest.mark.parametrize("name", ["embed", "embed-text", "predict", "pretrain-audio", "evaluate", "align", "finetune"])
def test_long_commands_take_threads_and_no_progress(name):
    parser = argparse.ArgumentParser()
    importlib.import_module(COMMANDS[name][0]).add_arguments(parser)
    flags = {s for a in parser._actions for s in a.option_strings}
    # evaluate's inner training never draws bars (plain lines); the others switch theirs off
    assert {"--threads"} | ({"--no-progress"} if name != "evaluate" else set()) <= flags


def test_pretrain_flags_become_config_overrides(tmp_path, monkeypatch):
    from respiramfm.encoders import pretrain

    seen = {}
    monkeypatch.setattr(pretrain, "pretrain", lambda cfg, resume=False: seen.setdefault("cfg", cfg) and "done")
    parser = argparse.ArgumentParser()
    pretrain.add_arguments(parser)
    pretrain.run(parser.parse_args(["--manifest", str(tmp_path / "m.csv"), "--threads", "1", "--no-progress"]))
    assert (seen["cfg"].torch_threads, seen["cfg"].progress) == (1, False)
    with pytest.raises(ConfigError, match="--threads"):
        pretrain.run(parser.parse_args(["--manifest", "m.csv", "--threads", "-1"]))


@pytest.mark.parametrize("module, fn", [("respiramfm.align.train", "train_align"),
                                        ("respiramfm.fusion.train", "finetune")])
def test_stage_flags_become_config_fields(module, fn, monkeypatch):
    """``align``/``finetune`` ``--threads 1 --no-progress`` reach the config as threads=1, progress=false."""
    mod = importlib.import_module(module)
    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        raise SystemExit(0)  # stop before any training or printing

    monkeypatch.setattr(mod, fn, fake)
    parser = argparse.ArgumentParser()
    mod.add_arguments(parser)
    with pytest.raises(SystemExit):
        mod.run(parser.parse_args(["--threads", "1", "--no-progress"]))
    assert (seen["cfg"].threads, seen["cfg"].progress) == (1, False)


def test_threads_flag_and_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("RESPIRAMFM_THREADS", raising=False)
        assert apply_threads_flag(1) == 1
        monkeypatch.setenv("RESPIRAMFM_THREADS", "2")
        assert apply_threads_flag(0) == 2
        monkeypatch.setenv("RESPIRAMFM_THREADS", "two")
        with pytest.raises(ConfigError, match="RESPIRAMFM_THREADS"):
            apply_threads_flag(0)
        with pytest.raises(ConfigError, match="--threads"):
            apply_threads_flag(-1)
    finally:
        torch.set_num_threads(before)


def test_plain_lines_when_bars_are_off(capsys):
    bar = progress(5, "embed logmel-stats", "clip", enabled=False, every_s=0.0)
    assert isinstance(bar, LineProgress)  # also what a log file (not a terminal) gets
    with bar:
        bar.update(2)
        bar.update(3)
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("embed logmel-stats: 2/5 clip (40 %)") and err[-1].startswith("embed logmel-stats: 5/5")


def test_training_prints_step_lines_between_logged_rows(capsys):
    """``finetune`` with progress off printed nothing for minutes when no row was logged: now each step may."""
    trainer = SimpleNamespace(is_main=True, run=SimpleNamespace(name="finetune"), state={"step": 3, "epoch": 0},
                              total_steps=40)
    p = Progress(False, "step", every_s=0.0)
    p.on_train_begin(trainer)
    p.on_step_end(trainer)
    assert "finetune: step=3 of=40 epoch=0" in capsys.readouterr().err
    quiet = Progress(False, "step", every_s=3600.0)  # at most one line per interval
    quiet.on_train_begin(trainer)
    quiet.on_step_end(trainer)
    assert capsys.readouterr().err == ""
