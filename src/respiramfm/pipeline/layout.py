"""Where a pipeline run keeps each stage's output under ``OUT/`` (every name written here once)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PipelineLayout:
    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    data = property(lambda self: self.root / "data")                  # manifests (and the cohort's audio)
    manifest = property(lambda self: self.data / "manifest.csv")
    tasks = property(lambda self: self.data / "tasks.yaml")           # the simulated cohort's task definitions
    encoder = property(lambda self: self.root / "encoder")            # a pretrained HTS-AT (pretrain-audio)
    audio = property(lambda self: self.root / "audio_emb")            # `embed`
    text = property(lambda self: self.root / "text_emb")              # `embed-text`
    align = property(lambda self: self.root / "align")                # stage 1
    model = property(lambda self: self.root / "model")                # the first seed's stage-2 model
    evaluate = property(lambda self: self.root / "evaluate")          # the protocol's run (see evaluate.layout)
    report = property(lambda self: self.root / "report.html")
    summary = property(lambda self: self.root / "demo_summary.json")
    config = property(lambda self: self.root / "pipeline.yaml")       # the resolved PipelineConfig

    def dataset_manifest(self, key: str) -> Path:
        return self.data / f"{key}.csv"

    def seed_encoder(self, seed: int) -> Path:
        """The encoder pretrained for seed ``seed`` (after the first) when every seed re-runs pretraining."""
        return self.root / "seeds" / f"seed{int(seed)}" / "encoder"

    def seed_audio(self, seed: int) -> Path:
        """``embed`` with that seed's encoder."""
        return self.root / "seeds" / f"seed{int(seed)}" / "audio_emb"

    def finetune(self, seed: int | str = "{seed}") -> Path:
        """Stage 2 of one seed (``{seed}`` left in: the evaluation's shared ``finetune_dir`` pattern)."""
        return self.root / "finetune" / f"seed{seed}"


__all__ = ["PipelineLayout"]
