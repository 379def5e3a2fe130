"""Stage-2 training: it learns, selects on validation only, resumes exactly, accumulates exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from testkit.finetune_synth import make_synth
from respiramfm import cli
from respiramfm.config import load_config
from respiramfm.errors import ConfigError
from respiramfm.fusion.train import FinetuneConfig, OptimConfig, finetune, lr_lambda

ROOT = Path(__file__).resolve().parents[2]
FAULT = ROOT / "tests" / "testkit" / "fault.py"  # runs the CLI with a callback that SIGKILLs after step N


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synth(tmp_path_factory.mktemp("ft_train"), drop=("ft_lung-train-005",))


@pytest.fixture(scope="module")
def trained(synth):
    cfg = load_config(FinetuneConfig, None, synth.sets(out_dir=synth.root / "run_a", epochs=3))
    return finetune(cfg)


def trainable(out: Path) -> dict[str, torch.Tensor]:
    latest = json.loads((out / "checkpoints" / "latest.json").read_text())["dir"]
    return load_file(str(out / "checkpoints" / latest / "model.safetensors"))


def saved_model_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {f"head/{k}": v for k, v in load_file(str(model_dir / "head.safetensors")).items()}
    adapter = load_file(str(model_dir / "adapter" / "adapter_model.safetensors"))
    out.update({f"adapter/{k}": v for k, v in adapter.items()})
    return out


def test_training_reduces_loss_and_beats_chance_on_validation(synth, trained):
    rows = [json.loads(line) for line in (trained.out_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    assert len(losses) == trained.last_step == 3 * 12  # (24 + 23) examples: 6 + 6 step batches per epoch
    assert np.mean(losses[-12:]) < 0.85 * np.mean(losses[:12])  # last epoch vs first epoch
    evals = trained.evals
    assert [e["step"] for e in evals] == [0, 12, 24, 36]  # untrained baseline + one per epoch
    assert trained.best["val_mean_auroc"] > 0.8 > evals[0]["val_mean_auroc"] + 0.1
    assert evals[-1]["val_loss"] < 0.8 * evals[0]["val_loss"]
    assert set(trained.best["val_auroc"]) == {"FT-A", "FT-B"}
    summary = json.loads((trained.out_dir / "summary.json").read_text())
    assert summary["best_step"] == trained.best_step and summary["examples"]["FT-B"] == {"train": 23, "val": 8}
    assert "ft_lung-train-005" in (trained.out_dir / "skipped.tsv").read_text()


def test_saved_model_reproduces_the_selected_validation_scores(synth, trained):
    from respiramfm.fusion.data import load_finetune_data, prepare_examples, resolved_items
    from respiramfm.fusion.infer import predict_logits
    from respiramfm.models.fusion import RespiraMFM

    model = RespiraMFM.from_pretrained(trained.out_dir / "model")
    info = json.loads((trained.out_dir / "model" / "config.json").read_text())["training"]
    assert info["selected_on"] == "validation" and info["step"] == trained.best_step
    data = load_finetune_data([str(synth.manifest)], [str(synth.store)], [], [str(synth.tasks)])
    prep = prepare_examples(model, data.val)
    logits = predict_logits(model, resolved_items(model, prep, range(len(prep)))).double()
    loss = float(torch.nn.functional.cross_entropy(logits, prep.labels))
    assert loss == pytest.approx(trained.best["val_loss"], abs=1e-5)


def test_test_records_cannot_change_the_selected_model(tmp_path, trained):
    """Same train/val, test rows flipped and extended: the selected checkpoint and saved weights are identical."""
    other = make_synth(tmp_path / "other", drop=("ft_lung-train-005",), flip_test=True, extra_test=5)
    assert other.manifest.read_text() != (trained.out_dir.parent / "manifest.csv").read_text()
    cfg = load_config(FinetuneConfig, None, other.sets(out_dir=tmp_path / "run_b", epochs=3))
    res = finetune(cfg)
    assert res.best_step == trained.best_step
    assert [e["val_loss"] for e in res.evals] == [e["val_loss"] for e in trained.evals]
    a, b = saved_model_tensors(trained.out_dir / "model"), saved_model_tensors(res.out_dir / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gradient_accumulation_equals_the_larger_batch(synth, tmp_path):
    common = dict(epochs=1, max_steps=5, eval_every=100)
    big = finetune(load_config(FinetuneConfig, None, synth.sets(out_dir=tmp_path / "b4", batch_size=4, **common)))
    acc = finetune(load_config(FinetuneConfig, None, synth.sets(out_dir=tmp_path / "b2a2", batch_size=2,
                                                                grad_accum=2, **common)))
    assert big.last_step == acc.last_step == 5
    a, b = trainable(tmp_path / "b4"), trainable(tmp_path / "b2a2")
    moved = [k for k in a if k.startswith("cur::") and "lora_B" in k]
    assert moved and all(a[k].abs().max() > 0 for k in moved)  # LoRA B started at zero and has trained
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-4)


def test_only_lora_and_head_change(synth, tmp_path):
    from respiramfm.fusion.data import load_finetune_data
    from respiramfm.fusion.train import build_model

    cfg = load_config(FinetuneConfig, None, synth.sets(out_dir=tmp_path / "frozen", epochs=1, max_steps=4))
    data = load_finetune_data(cfg.manifests, cfg.audio_store, cfg.tasks, cfg.task_files)
    torch.manual_seed(0)
    model = build_model(cfg, data, "cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable_names and all("lora_" in n or n.startswith("head.") for n in trainable_names)
    finetune(cfg, data=data, model=model)
    after = dict(model.named_parameters())
    for n, p in before.items():
        if n in trainable_names:
            continue
        assert torch.equal(p, after[n]), f"frozen parameter {n} changed"
    assert all(torch.equal(b, dict(model.named_buffers())[n]) for n, b in buffers.items())
    trained_now = {k[len("cur::"):]: v for k, v in trainable(tmp_path / "frozen").items() if k.startswith("cur::")}
    assert set(trained_now) == trainable_names  # the checkpoint holds exactly LoRA + head
    assert all(not torch.equal(before[n], trained_now[n]) for n in trainable_names)
    assert not model.projector.training


def _cli_args(synth, out: Path, **extra) -> list[str]:
    # LoRA dropout on: the resumed run must also restore the RNG stream
    sets = synth.sets(out_dir=out, epochs=2, checkpoint_every=2, eval_every=3, **{"model.lora.dropout": 0.1}, **extra)
    return ["finetune", *[a for s in sets for a in ("--set", s)]]


def test_resume_after_sigkill_equals_an_uninterrupted_run(synth, tmp_path, capsys):
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    assert cli.main(_cli_args(synth, ref)) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(FAULT), "5", *_cli_args(synth, victim)], env=env,  # SIGKILL after step 5
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert json.loads((victim / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert not (victim / "summary.json").exists()
    capsys.readouterr()
    assert cli.main(_cli_args(synth, victim)) == 0
    assert "resuming from step 4" in capsys.readouterr().out
    a, b = trainable(ref), trainable(victim)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ra = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in (victim / "metrics.jsonl").read_text().splitlines()]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]  # noqa: E731
    assert strip(ra) == strip(rb)
    sa, sb = saved_model_tensors(ref / "model"), saved_model_tensors(victim / "model")
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # a changed configuration refuses to resume; --fresh starts over
    bad = _cli_args(synth, victim) + ["--set", "optim.lr=0.1"]
    assert cli.main(bad) == 1 and "different configuration" in capsys.readouterr().err
    assert cli.main(bad + ["--fresh", "--set", "max_steps=1"]) == 0


def test_config_files_and_schedule(synth):
    official = load_config(FinetuneConfig, ROOT / "configs" / "paper" / "finetune.yaml")
    o = official.optim
    assert (o.lr, o.betas, o.eps, o.weight_decay) == (1e-5, [0.9, 0.95], 1e-8, 0.1)
    assert (official.epochs, official.batch_size, official.seed, official.mixing) == (20, 16, 420, "concat")
    assert official.model.lora.r == 16 and official.model.lora.alpha == 32 and official.model.lora.dropout == 0.1
    ours = load_config(FinetuneConfig, ROOT / "configs" / "finetune.yaml", ["batch_size=8"])
    assert ours.batch_size == 8 and ours.model.backbone == "smollm2-135m"
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(FinetuneConfig, None, ["optim.momentum=0.9"])
    with pytest.raises(ConfigError, match="mixing"):
        load_config(FinetuneConfig, None, synth.sets(mixing="zip")).validate()
    f = lr_lambda(OptimConfig(lr=1e-4, min_lr=1e-6, warmup_steps=2), total_steps=12)
    assert f(0) == pytest.approx(1 / 3) and f(2) == pytest.approx(1.0) and f(12) == pytest.approx(0.01)
    assert all(f(i) >= f(i + 1) for i in range(2, 12))


def test_proportional_mixing_and_loss_selection_run(synth, tmp_path):
    cfg = load_config(FinetuneConfig, None, synth.sets(out_dir=tmp_path / "prop", epochs=1, mixing="proportional",
                                                       select_metric="loss", patience=1, eval_every=2))
    res = finetune(cfg)
    losses = [e["val_loss"] for e in res.evals]
    assert res.best["val_loss"] == min(losses)
    assert res.stopped_early or res.last_step <= 12


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_step_batch(synth, tmp_path):
    """accelerate DDP over 2 CPU processes, batch 2 each == 1 process, batch 4 (both ranks saw different halves)."""
    common = dict(epochs=1, max_steps=4, eval_every=100)
    one = tmp_path / "one"
    finetune(load_config(FinetuneConfig, None, synth.sets(out_dir=one, batch_size=4, **common)))
    two = tmp_path / "two"
    sets = synth.sets(out_dir=two, batch_size=2, device="cpu", **common)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "respiramfm.cli", "finetune", *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"best_step"') == 1  # one summary line, from rank 0
    latest = two / "checkpoints" / json.loads((two / "checkpoints" / "latest.json").read_text())["dir"]
    assert json.loads((latest / "state.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in latest.glob("rng_rank*")) == ["rng_rank0.safetensors", "rng_rank1.safetensors"]
    a, b = trainable(one), trainable(two)
    assert a.keys() == b.keys()
    for k in a:  # had both ranks seen the same half, the averaged gradients (and weights) would differ
        torch.testing.assert_close(b[k], a[k], atol=5e-5, rtol=1e-3)
    rows = lambda d: [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    la = [r["loss"] for r in rows(one) if r["kind"] == "train"]
    lb = [r["loss"] for r in rows(two) if r["kind"] == "train"]
    np.testing.assert_allclose(lb, la, rtol=1e-4)


@pytest.mark.slow
def test_end_to_end_on_the_real_smollm2(tmp_path, smollm2):
    """A handful of steps on the offline SmolLM2-135M; the saved model reloads and predicts."""
    from respiramfm.models.fusion import RespiraMFM
    from respiramfm.models.sequence import FusionItem

    s = make_synth(tmp_path / "data", hidden=576)
    sets = s.sets(out_dir=tmp_path / "run", epochs=1, max_steps=3, batch_size=2, eval_every=3,
                  eval_batch_size=16, **{"model.backbone": "smollm2-135m", "model.lora.r": 16,
                                         "model.lora.alpha": 32, "optim.lr": 1e-4})
    assert cli.main(["finetune", *[a for x in sets for a in ("--set", x)]]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["last_step"] == 3 and summary["best"]["n_val"] == 16
    model = RespiraMFM.from_pretrained(tmp_path / "run" / "model")
    assert model.hidden_size == 576 and model.cfg.backbone == "smollm2-135m"
    p = model.predict_proba([FusionItem(task="FT-A", audio=np.ones(16, np.float32),
                                        context="Patient presents with no obvious respiratory symptoms.")])
    assert p.shape == (1,) and 0.0 < p[0] < 1.0


def test_each_epoch_sees_every_training_example_once_in_a_new_order(synth, tmp_path, monkeypatch):
    from respiramfm.fusion import train as train_mod

    seen: list[list[int]] = []
    original = train_mod._Step.forward

    def spy(self, idx):
        seen.append(idx.tolist())
        return original(self, idx)

    monkeypatch.setattr(train_mod._Step, "forward", spy)
    res = finetune(load_config(FinetuneConfig, None, synth.sets(out_dir=tmp_path / "spy", epochs=2, eval_every=100)))
    assert res.last_step == 24 and len(seen) == 24
    epochs = [sorted(i for b in seen[e * 12:(e + 1) * 12] for i in b) for e in range(2)]
    assert epochs[0] == epochs[1] == list(range(47))  # FT-A 24 + FT-B 23: 6 + 6 step batches of <= 4
    assert seen[:12] != seen[12:]


def test_bad_inputs_are_clean_errors(synth, tmp_path, capsys):
    def run(**extra) -> str:
        sets = synth.sets(out_dir=tmp_path / "bad", **extra)
        assert cli.main(["finetune", *[a for s in sets for a in ("--set", s)]]) == 1
        return capsys.readouterr().err

    assert "projector" in run(projector=tmp_path / "nowhere")
    assert "nowhere.csv" in run(manifests=f"[{tmp_path / 'nowhere.csv'}]")
    assert "not an embedding store" in run(audio_store=f"[{tmp_path}]")
    assert "unknown task" in run(tasks="[NOPE]")
    assert "projector is not set" in run(projector="")
