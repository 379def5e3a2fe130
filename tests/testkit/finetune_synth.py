"""A small stage-2 input written in the production on-disk formats (imported by the finetune tests).

Two supervised tasks and one zero-shot task (tasks.yaml), a records manifest with patient-level
train/val/test splits, an embedding store written with the store's own shard/view writers, and a
saved projector. Labels are carried by both modalities (a symptom sentence and a shift of the audio
vector), with label noise, so a tiny LLM with LoRA can learn them in a few dozen steps.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from respiramfm.models.configuration import ProjectorConfig
from respiramfm.models.projector import build_projector, save_projector
from respiramfm.data.records import Record, write_manifest
from respiramfm.data.tasks import Task, dump_tasks_yaml
from respiramfm.cache import VectorCache
from respiramfm.cache.view import write_view

IN_DIM = 16
HIDDEN = 64
TASKS = (
    Task("FT-A", "ft_cough", disease="COVID19", disease_phrase="COVID-19", positive=("covid",),
         negative=("healthy",), audio_type="cough", role="supervised", simulated=True,
         description="This data comes from a synthetic test cohort.", extra={"negative_class": "non-COVID19"}),
    Task("FT-B", "ft_lung", disease="COPD", disease_phrase="Chronic obstructive pulmonary disease (COPD)",
         positive=("copd",), negative=("healthy",), audio_type="lung", role="supervised", simulated=True),
    Task("FT-Z", "ft_zero", disease="asthma", disease_phrase="asthma", positive=("asthma",), negative=("healthy",),
         audio_type="lung", role="zero-shot", simulated=True),
)
POS = {"ft_cough": "covid", "ft_lung": "copd", "ft_zero": "asthma"}
SYMPTOMS = ["fever", "dry cough", "fatigue", "shortness of breath", "wheezing", "chest tightness"]


@dataclass
class Synth:
    root: Path
    manifest: Path
    tasks: Path
    store: Path
    projector: Path

    def sets(self, **extra) -> list[str]:
        """``--set`` overrides for a fast tiny-llama run on this data."""
        base = {
            "manifests": f"[{self.manifest}]", "task_files": f"[{self.tasks}]", "audio_store": f"[{self.store}]",
            "projector": str(self.projector), "model.backbone": "tiny-llama",
            "model.tiny": "{hidden_size: 64, num_layers: 2, heads: 4}", "model.lora.r": "4",
            "model.lora.alpha": "8", "model.lora.dropout": "0.0", "optim.lr": "0.003", "optim.weight_decay": "0.0",
            "batch_size": "4", "epochs": "2", "progress": "false", "threads": "1", "log_every": "1",
        }
        base.update({k: str(v) for k, v in extra.items()})
        return [f"{k}={v}" for k, v in base.items()]


def _record(ds: str, i: int, split: str, rng: np.random.Generator, flip: bool = False) -> tuple[Record, int]:
    y = int(i % 2 == 0) ^ int(flip)
    noisy = y if rng.random() > 0.1 else 1 - y  # 10% of the contexts tell the other story
    listed = "; ".join(rng.choice(SYMPTOMS, size=int(rng.integers(1, 4)), replace=False))
    symptoms = listed if noisy else "none"
    age = float(rng.integers(18, 90)) if rng.random() > 0.2 else None
    rec = Record(record_id=f"{ds}-{split}-{i:03d}", patient_id=f"{ds}-p{split}{i:03d}", dataset=ds,
                 audio_path=f"audio/{ds}/{i}.wav", audio_type="lung" if ds != "ft_cough" else "cough",
                 diagnosis=POS[ds] if y else "healthy", age=age, sex=str(rng.choice(["male", "female", ""])),
                 symptoms=symptoms, smoker=str(rng.choice(["yes", "no", ""])), split=split,
                 location="posterior left lower" if ds != "ft_cough" else "", extra={"simulated": True})
    return rec, y


def make_records(seed: int = 0, n=(24, 8, 8), flip_test: bool = False, extra_test: int = 0) -> list[tuple[Record, int]]:
    out = []
    for d, ds in enumerate(("ft_cough", "ft_lung")):
        for s, (split, count) in enumerate(zip(("train", "val", "test"), n)):
            rng = np.random.default_rng([seed, d, s])  # one stream per (dataset, split): test edits touch only test
            count += extra_test if split == "test" else 0
            out += [_record(ds, i, split, rng, flip=flip_test and split == "test") for i in range(count)]
    rng = np.random.default_rng([seed, 9])
    out += [_record("ft_zero", i, "test", rng) for i in range(6)]
    return out


def audio_vector(record_id: str, y: int, seed: int) -> np.ndarray:
    """A per-record vector (seeded by its id): label shifts dimension 0."""
    h = int(hashlib.sha256(f"{seed}/{record_id}".encode()).hexdigest()[:8], 16)
    v = np.random.default_rng(h).normal(size=IN_DIM).astype(np.float32)
    v[0] += 1.5 * (2.0 * y - 1.0)
    return v


def write_store(out: Path, ids: list[str], vectors: np.ndarray, drop: tuple[str, ...] = ()) -> Path:
    """An embedding store (shards + view) holding ``vectors`` for ``ids`` except ``drop``."""
    keep = [(i, v) for i, v in zip(ids, vectors) if i not in drop]
    keys = [hashlib.sha256(i.encode()).hexdigest() for i, _ in keep]
    group = VectorCache(out / "cache" / "synthetic", {"encoder": "synthetic"})
    group.put({k: v for k, (_, v) in zip(keys, keep)}, {})
    group.scan()
    meta = {"encoder": "synthetic", "weights_hash": "none", "frontend_key": "none", "frontend": {},
            "kind": "pooled", "dim": IN_DIM, "checkpoint": None}
    write_view(out, group, [i for i, _ in keep], keys, (IN_DIM,), meta)
    return out


def make_synth(root: Path, seed: int = 0, drop: tuple[str, ...] = (), hidden: int = HIDDEN, **kw) -> Synth:
    root.mkdir(parents=True, exist_ok=True)
    pairs = make_records(seed, **kw)
    write_manifest([r for r, _ in pairs], root / "manifest.csv")
    dump_tasks_yaml(TASKS, root / "tasks.yaml")
    vecs = np.stack([audio_vector(r.record_id, y, seed) for r, y in pairs])
    write_store(root / "store", [r.record_id for r, _ in pairs], vecs, drop)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        proj = build_projector(ProjectorConfig(in_dim=IN_DIM, hidden=32, out_dim=hidden, final="layernorm"))
    save_projector(proj, root / "projector", {"note": "test projector"})
    return Synth(root, root / "manifest.csv", root / "tasks.yaml", root / "store", root / "projector")
