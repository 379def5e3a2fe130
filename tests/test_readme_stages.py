"""The README's pipeline, stage by stage, on a supervised dataset (ICBHI, T4) and a zero-shot-only one (KAUH, T7-T9).

A new user who prepares KAUH like any dataset gets its patients dealt 70/10/20; every training
stage must then refuse, naming the dataset and the row count. With ``prepare kauh --role zero-shot``
the whole README path (prepare -> pretrain-audio -> embed -> embed-text -> align -> finetune ->
evaluate) runs, and no KAUH record reaches any training stage while T7-T9 are scored on all of KAUH.

Inputs: the real KAUH recordings of ../shared/data; a small ICBHI tree in the published
cycle-segment layout with synthetic sound (10 COPD and 10 healthy patients, a tone that differs by
class); a tiny llama saved to disk as the LLM; the tiny HTS-AT of configs/cpu pretrained for 2 steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from respiramfm.cli import main
from respiramfm.data.records import read_manifest
from respiramfm.data.tasks import get_task
from testkit.tones import write_tone_wav

ROOT = Path(__file__).resolve().parents[1]
SR = 4000


def _wav(path: Path, seconds: float, seed: int, tone: float) -> None:
    write_tone_wav(path, seconds, seed, tone, SR)


def _icbhi_segments(root: Path) -> None:
    n = {"crack": 0, "normal": 0}
    diag, demo = ["ID,CLASS"], []
    for pid in range(101, 121):
        cls = "COPD" if pid % 2 else "Healthy"
        diag.append(f"{pid},{cls}")
        demo.append(f"{pid} {70 if cls == 'COPD' else 30} {'M' if pid % 4 < 2 else 'F'} NA NA NA")
        for cycle in (1, 2):
            kind = "crack" if cls == "COPD" else "normal"
            n[kind] += 1
            name = f"{kind}{'_' if kind == 'normal' else ''}{n[kind]}__{pid}_1b1_Al_sc_Meditron_s{cycle}_.wav"
            _wav(root / kind.capitalize() / name, 2.0, pid * 10 + cycle, 200.0 if cls == "COPD" else 90.0)
    (root / "patient_diagnosis.csv").write_text("\n".join(diag) + "\n")
    (root / "demographic_info.txt").write_text("\n".join(demo) + "\n")


def _sets(**kv) -> list[str]:
    out = []
    for k, v in kv.items():
        out += ["--set", f"{k.replace('__', '.')}={v}"]
    return out


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory) -> Path:
    from respiramfm.llm.backbones import tiny_backbone

    d = tmp_path_factory.mktemp("llm") / "tiny-llama"
    bb = tiny_backbone("llama", hidden_size=32, num_layers=2, heads=2, seed=3)
    bb.model.save_pretrained(d)
    bb.tokenizer.save_pretrained(d)
    return d


@pytest.mark.slow
def test_readme_stages_refuse_kauh_without_its_role_and_run_with_it(shared_data, llm_dir, tmp_path, capsys):
    w = tmp_path
    _icbhi_segments(w / "raw" / "icbhi")
    # ---- prepare: ICBHI as usual; KAUH once as a new user would, once with its role
    assert _run(capsys, "prepare", "icbhi", "--root", w / "raw" / "icbhi", "--out", w / "icbhi.csv")[0] == 0
    rc, out, _ = _run(capsys, "prepare", "kauh", "--root", shared_data / "kauh", "--out", w / "kauh_naive.csv")
    assert rc == 0 and "note: kauh serves only zero-shot paper tasks" in out
    assert _run(capsys, "prepare", "kauh", "--root", shared_data / "kauh", "--out", w / "kauh.csv",
                "--role", "zero-shot")[0] == 0
    assert _run(capsys, "merge", w / "icbhi.csv", w / "kauh_naive.csv", "--out", w / "naive.csv")[0] == 0
    assert _run(capsys, "merge", w / "icbhi.csv", w / "kauh.csv", "--out", w / "manifest.csv")[0] == 0
    naive, good = read_manifest(w / "naive.csv"), read_manifest(w / "manifest.csv")
    leaked = sum(r.dataset == "kauh" and r.split != "test" for r in naive)
    assert leaked > 0 and {r.split for r in good if r.dataset == "kauh"} == {"test"}
    icbhi_fit = {r.record_id for r in good if r.dataset == "icbhi" and r.split in ("train", "val")}
    kauh_ids = {r.record_id for r in good if r.dataset == "kauh"}
    assert len(kauh_ids) == 30 and len(icbhi_fit) >= 28

    pre = ["pretrain-audio", "--config", ROOT / "configs" / "cpu" / "pretrain_audio.yaml",
           *_sets(max_steps=2, batch_size=8, save_every=2, torch_threads=1, device="cpu")]
    # ---- without the role: pretrain-audio refuses (before any audio is read)
    rc, _, err = _run(capsys, *pre, "--manifest", w / "naive.csv", "--out", w / "enc_naive")
    assert rc == 1 and "pretrain-audio refuses" in err and f"kauh: {leaked} row(s)" in err
    assert "--role zero-shot" in err
    assert not (w / "enc_naive" / "spec_cache").exists()

    # ---- with it: the README path
    assert _run(capsys, *pre, "--manifest", w / "manifest.csv", "--out", w / "enc")[0] == 0
    pretrained = (w / "enc" / "recordings.tsv").read_text()
    assert "kauh/" not in pretrained and len(pretrained.strip().splitlines()) - 1 == len(icbhi_fit)
    assert _run(capsys, "embed", "--manifest", w / "manifest.csv", "--encoder", "opera-ct", "--checkpoint",
                w / "enc" / "encoder.safetensors", "--out", w / "audio")[0] == 0
    assert _run(capsys, "embed-text", "--manifest", w / "manifest.csv", "--out", w / "text",
                "--backbone", llm_dir, "--batch-size", "16")[0] == 0
    align = ["align", "--config", ROOT / "configs" / "align.yaml",
             *_sets(audio_store=w / "audio", text_store=w / "text", projector__in_dim=128, projector__hidden=32,
                    epochs=3, eval_every=1, figure="false", progress="false", threads=1)]
    rc, _, err = _run(capsys, *align, "--set", f"manifest={w / 'naive.csv'}", "--set", f"out_dir={w / 'a_naive'}")
    assert rc == 1 and "align refuses" in err and f"kauh: {leaked} row(s)" in err
    rc, out, _ = _run(capsys, *align, "--set", f"manifest={w / 'manifest.csv'}", "--set", f"out_dir={w / 'align'}")
    assert rc == 0
    line = json.loads(out.strip().splitlines()[-1])
    assert line["datasets"] == ["icbhi"] and line["datasets_from"] == "supervised tasks"  # says which
    summary = json.loads((w / "align" / "summary.json").read_text())
    assert summary["n_train"] + summary["n_val"] == len(icbhi_fit)
    compat = summary["provenance"]["compat"]
    assert compat["encoder"]["name"] == "opera-ct" and compat["encoder"]["dim"] == 128
    assert compat["llm"]["hidden_size"] == 32 and compat["llm"]["layers"] == "all"

    ft = ["finetune", "--config", ROOT / "configs" / "finetune.yaml",
          *_sets(audio_store=f"[{w / 'audio'}]", projector=w / "align", model__backbone=llm_dir, epochs=1,
                 max_steps=3, batch_size=8, eval_every=3, optim__warmup_steps=0, progress="false", threads=1,
                 device="cpu", model__lora__r=2, model__lora__alpha=4)]
    rc, _, err = _run(capsys, *ft, "--set", f"manifests=[{w / 'naive.csv'}]", "--set", f"out_dir={w / 'ft_naive'}")
    assert rc == 1 and "finetune refuses" in err and f"kauh: {leaked} row(s)" in err
    assert _run(capsys, *ft, "--set", f"manifests=[{w / 'manifest.csv'}]", "--set", f"out_dir={w / 'ft'}")[0] == 0
    ft_summary = json.loads((w / "ft" / "summary.json").read_text())
    assert set(ft_summary["examples"]) == {"T4"}
    assert sum(ft_summary["examples"]["T4"].values()) == len(icbhi_fit)
    model_cfg = json.loads((w / "ft" / "model" / "config.json").read_text())
    assert model_cfg["projector"]["provenance"]["compat"] == compat  # carried for predict/serve

    ev = ["evaluate", "--config", ROOT / "configs" / "evaluate.yaml",
          *_sets(manifests=f"[{w / 'manifest.csv'}]", audio_store=f"[{w / 'audio'}]", text_store=w / "text",
                 projector=w / "align", tasks="[T4,T7,T8,T9]", systems="[respiramfm]", seeds="[0]", n_boot=20,
                 out_dir=w / "eval", report="false", align__epochs=2, align__eval_every=1,
                 align__projector__hidden=32, align__figure="false", align__threads=1,
                 finetune__model__backbone=llm_dir, budget__epochs=1, budget__max_steps=2, budget__batch_size=8,
                 budget__optim__warmup_steps=0, finetune__model__lora__r=2, finetune__model__lora__alpha=4,
                 finetune__threads=1, finetune__device="cpu")]
    rc, _, err = _run(capsys, *ev)
    assert rc == 0, err[-2000:]
    # the evaluation re-ran stage 1 and stage 2 per seed: on ICBHI only, and it scored T7-T9 on all of KAUH
    runs = [json.loads(p.read_text()) for p in (w / "eval").rglob("summary.json")]
    stage1 = [r for r in runs if "n_train" in r and "datasets" in r]
    stage2 = [r for r in runs if "examples" in r]
    assert stage1 and all(r["datasets"] == ["icbhi"] and r["n_train"] + r["n_val"] == len(icbhi_fit) for r in stage1)
    assert stage2 and all(set(r["examples"]) == {"T4"} for r in stage2)
    rows = [line.split(",") for p in (w / "eval" / "predictions").rglob("*.csv")
            for line in p.read_text().splitlines()[1:]]
    for task in ("T7", "T8", "T9"):
        want = {r.record_id for r, _ in get_task(task).select(good)}
        assert want and {row[0] for row in rows if row[2] == task} == want
