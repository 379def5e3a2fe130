"""``OUT/provenance.json``: package versions, seeds, systems, the config and the hashes of every input."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from respiramfm.config import to_dict
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.evaluate.data import EvalData
from respiramfm.utils.io import sha256_file

PACKAGES = ("respiramfm", "torch", "transformers", "peft", "accelerate", "scikit-learn", "numpy")


def _hash_dir_meta(d: str) -> dict:
    p = Path(d)
    files = [p] if p.is_file() else sorted(x for x in p.glob("*") if x.is_file() and x.suffix in (".json", ".safetensors"))
    return {str(f): sha256_file(f) for f in files}


def provenance(cfg: EvaluateConfig, data: EvalData) -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    hashes: dict = {}
    for item in [*cfg.manifests, *cfg.task_files]:
        hashes[item] = sha256_file(item)
    for d in [*cfg.audio_store, cfg.text_store, cfg.projector]:
        if d and Path(d).exists():
            hashes.update(_hash_dir_meta(d))
    return {"versions": versions, "seeds": list(cfg.seeds), "systems": list(cfg.systems),
            "config": to_dict(cfg), "data_sha256": hashes, "simulated": data.simulated,
            "tasks": {n: {"role": t.role, "dataset": t.dataset, "simulated": t.simulated}
                      for n, t in data.tasks.items()}}


__all__ = ["provenance"]
