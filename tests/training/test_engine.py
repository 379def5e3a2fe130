"""The shared training engine on a toy task: resume, accumulation, selection, schedules, callbacks."""

from __future__ import annotations

import json

import pytest
import torch

from respiramfm.errors import ConfigError, DataError
from respiramfm.training.callbacks import Callback, is_better
from respiramfm.training.config import Budget, OptimConfig, RunSettings
from respiramfm.training.engine import TrainTask, Trainer
from respiramfm.training.optim import make_optimizer, make_scheduler


class Crash(Exception):
    pass


class CrashAfter(Callback):
    """Stands in for a kill: stops the process's work right after step ``n`` (and its checkpoint)."""

    def __init__(self, n: int):
        self.n = n

    def on_step_end(self, trainer) -> None:
        if trainer.state["step"] == self.n:
            raise Crash


class Events(Callback):
    def __init__(self):
        self.seen: list[str] = []

    def on_train_begin(self, trainer):
        self.seen.append("begin")

    def on_evaluate(self, trainer, row):
        self.seen.append(f"eval@{row['step']}")

    def on_epoch_end(self, trainer):
        self.seen.append(f"epoch@{trainer.state['epoch']}")

    def on_checkpoint(self, trainer, path):
        self.seen.append(f"ckpt@{trainer.state['step']}")

    def on_train_end(self, trainer):
        self.seen.append("end")


class Toy(TrainTask):
    """Noisy linear regression with dropout; validation MSE rises once it overfits the 12 training rows."""

    evaluates = True

    def __init__(self, seed: int = 0, batch: int = 4):
        g = torch.Generator().manual_seed(123)
        w = torch.randn(6, 1, generator=g)
        self.x = torch.randn(12, 6, generator=g)
        self.y = self.x @ w + 1.5 * torch.randn(12, 1, generator=g)
        self.vx = torch.randn(40, 6, generator=g)
        self.vy = self.vx @ w
        torch.manual_seed(seed)
        self.model = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 1))
        self.batch = batch

    def steps_in_epoch(self, epoch):
        return 12 // self.batch

    def batches(self, epoch, start):
        perm = torch.randperm(12, generator=torch.Generator().manual_seed(1000 + epoch))
        return [perm[i * self.batch:(i + 1) * self.batch] for i in range(12 // self.batch)][start:]

    def compute_loss(self, idx):
        err = (self.model(self.x[idx]) - self.y[idx]).pow(2).sum() / self.batch
        return err, {"n": torch.tensor(float(len(idx)))}

    def evaluate(self):
        self.model.eval()
        with torch.no_grad():
            return {"val_mse": float((self.model(self.vx) - self.vy).pow(2).mean())}


def budget(**kw) -> Budget:
    optim = OptimConfig(optimizer="adam", lr=0.05, betas=[0.9, 0.999], weight_decay=0.0, schedule="cosine",
                        min_lr=0.005, max_grad_norm=kw.pop("clip", 0.0))
    return Budget(optim=optim, **{"epochs": 6, "eval_every": 2, "eval_unit": "step", "select_metric": "val_mse",
                                  "select_mode": "min", **kw})


def settings(out, **kw) -> RunSettings:
    return RunSettings(**{"out_dir": str(out), "device": "cpu", "checkpoint_every": 5, "log_every": 1,
                          "progress": False, "dropout_seed": 7, **kw})


def weights(task: Toy) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in task.model.state_dict().items()}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_a_crashed_run_resumes_to_the_uninterrupted_result(tmp_path):
    ref_task = Toy()
    ref = Trainer(ref_task, budget(clip=1.0), settings(tmp_path / "ref"))
    ref.fit()
    victim = Trainer(Toy(), budget(clip=1.0), settings(tmp_path / "victim"), callbacks=[CrashAfter(8)])
    with pytest.raises(Crash):
        victim.fit()
    latest = json.loads((tmp_path / "victim" / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 6  # steps 5 (every 5) and 6 (epoch end) were checkpointed, 7 and 8 are lost
    rows = [json.loads(x) for x in (tmp_path / "victim" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 8  # rows of the lost steps were written ...
    task = Toy(seed=99)  # ... a different initialisation: everything must come from the checkpoint
    again = Trainer(task, budget(clip=1.0), settings(tmp_path / "victim"))
    assert again.state["step"] == 6 and again.resumed_from is not None
    again.fit()
    a, b = weights(ref_task), weights(task)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rs: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rs]  # noqa: E731
    assert strip(ref.rows) == strip(again.rows)  # ... and were dropped, then redone identically
    assert ref.state == again.state and ref.state["best_step"] < ref.state["step"]


def test_changed_settings_or_data_refuse_to_resume(tmp_path):
    Trainer(Toy(), budget(epochs=1), settings(tmp_path), fingerprint={"config": {"lr": 1}, "data": "a"}).fit()
    with pytest.raises(ConfigError, match=r"\['lr'\]"):
        Trainer(Toy(), budget(epochs=1), settings(tmp_path), fingerprint={"config": {"lr": 2}, "data": "a"})
    with pytest.raises(DataError, match="differ"):
        Trainer(Toy(), budget(epochs=1), settings(tmp_path), fingerprint={"config": {"lr": 1}, "data": "b"})
    with pytest.raises(ConfigError, match="--resume"):
        Trainer(Toy(), budget(epochs=1), settings(tmp_path, existing="refuse"))
    fresh = Trainer(Toy(), budget(epochs=1), settings(tmp_path, existing="restart"))
    assert fresh.state["step"] == 0 and not (tmp_path / "checkpoints").exists()


def test_gradient_accumulation_equals_the_whole_batch(tmp_path):
    whole, split = Toy(), Toy()
    for task, accum in ((whole, 1), (split, 2)):
        task.model[1].p = 0.0  # no dropout: the two runs draw random numbers differently
        Trainer(task, budget(epochs=2, select_metric="", grad_accum=accum),
                RunSettings(device="cpu", progress=False)).fit()
    a, b = weights(whole), weights(split)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(a[k], weights(Toy())[k]) for k in a)


def test_selection_keeps_the_best_evaluation_and_patience_stops(tmp_path):
    task = Toy()
    tr = Trainer(task, budget(epochs=40, patience=3), RunSettings(device="cpu", progress=False))
    st = tr.fit()
    evals = tr.evaluations()
    best = min(evals, key=lambda r: r["val_mse"])
    assert st["best_step"] == best["step"] and st["stopped"] and st["step"] < tr.total_steps
    assert [r["improved"] for r in evals[-3:]] == [False] * 3 and st["step"] == best["step"] + 3 * 2
    assert task.evaluate()["val_mse"] == pytest.approx(best["val_mse"], rel=1e-6)  # the best weights came back
    assert is_better("max", 2.0, 1.0) and not is_better("min", 2.0, 1.0) and is_better("last", 0.0, 1.0)


def test_events_cadence_rows_and_plain_progress(tmp_path, capsys):
    ev = Events()
    tr = Trainer(Toy(), budget(epochs=2, eval_every=0), settings(tmp_path, checkpoint_every=4,
                                                                 checkpoint_epoch_end=False), callbacks=[ev])
    tr.fit()
    assert ev.seen == ["begin", "eval@0", "eval@3", "epoch@1", "ckpt@4", "eval@6", "ckpt@6", "epoch@2", "end"]
    assert [e for e in ev.seen if e.startswith("eval")] == ["eval@0", "eval@3", "eval@6"]  # start + epoch ends
    assert [e for e in ev.seen if e.startswith("ckpt")] == ["ckpt@4", "ckpt@6"]  # every 4 steps + the last one
    train = [r for r in tr.rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 7)) and all(r["n"] == 4.0 for r in train)
    assert train[0]["lr"] > train[-1]["lr"]  # cosine over the 6 steps
    assert "train:" in capsys.readouterr().err  # bars off: plain lines on stderr


def test_per_epoch_schedules_and_config_checks():
    p = torch.nn.Parameter(torch.zeros(1))
    cfg = OptimConfig(optimizer="adamw", lr=1e-3, schedule="exponential", decay=0.5)
    opt = make_optimizer(cfg, [p])
    sched = make_scheduler(cfg, opt, total_steps=10)
    for _ in range(2):  # two epochs
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == 1e-3 * 0.5**2 and isinstance(opt, torch.optim.AdamW)
    with pytest.raises(ConfigError, match="schedule"):
        OptimConfig(schedule="linear").validate()
    with pytest.raises(ConfigError, match="existing"):
        RunSettings(existing="maybe").validate()
    with pytest.raises(DataError, match="no optimiser step"):
        Trainer(Toy(batch=24), budget(), RunSettings(device="cpu", progress=False))


def test_auto_precision_takes_bf16_only_where_it_is_faster(monkeypatch):
    """``precision: auto`` (the CPU preset's) runs bf16 autocast only on CPUs where it measured faster; on a
    CPU without native bf16 dot products torch's reference bf16 GEMM is many times slower than fp32."""
    from pathlib import Path

    from respiramfm.training import engine

    monkeypatch.setattr(engine, "_BF16_PAYS", {})
    measured = engine.bf16_pays("cpu")
    assert isinstance(measured, bool) and engine._BF16_PAYS == {"cpu": measured}  # measured once per process
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    if flags and "avx512_bf16" not in flags and "amx_bf16" not in flags:
        assert measured is False  # no native bf16 here: auto must not pick it
    for pays, want, mixed in ((False, "fp32", "no"), (True, "bf16", "bf16")):
        monkeypatch.setattr(engine, "_BF16_PAYS", {"cpu": pays})
        assert engine.resolve_precision("auto", "cpu") == want
        assert engine.make_accelerator("cpu", "auto").mixed_precision == mixed
        assert engine.resolve_precision("bf16", "cpu") == "bf16" and engine.resolve_precision("fp32", "cpu") == "fp32"
