"""Where an evaluation run keeps its files: every folder and file name of ``OUT/`` is written here once.

::

    OUT/config.yaml, provenance.json              the run's settings and data hashes
    OUT/predictions/SYSTEM/seedN.csv              one (system, seed) unit's test predictions
    OUT/work/SYSTEM/seedN/                        that unit's training (finetune/ for the LLM systems)
    OUT/stage1/seedN/                             stage 1 (align) of seed N, when the run aligns per seed
    OUT/efficiency/SYSTEM/                        the data-efficiency curve of SYSTEM:
        runs/fF/seedN/{manifest.csv, predictions.csv, work/, stage1/}
        data_efficiency.json, data_efficiency.md
    OUT/results.{csv,json,md}, report.html, figures/*.png, textcheck.json

The protocol, the data-efficiency retraining, the tables and the report all take their paths
from :class:`RunLayout`; nothing else spells these names.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

FINETUNE = "finetune"          # a system's stage-2 run inside its work folder
PREDICTIONS = "predictions.csv"  # a data-efficiency unit's predictions (same format as the protocol's)


def finetune_dir(work_dir: str | os.PathLike, custom: str = "", seed: int | None = None) -> Path:
    """The stage-2 run of a unit: ``custom`` (may hold ``{seed}``) when given, else ``WORK/finetune``."""
    if custom:
        return Path(str(custom).format(seed=seed))
    return Path(work_dir) / FINETUNE


@dataclass(frozen=True)
class EfficiencyLayout:
    """``OUT/efficiency/SYSTEM/`` (or any folder given to the data-efficiency run)."""

    root: Path

    def unit(self, fraction: float, seed: int) -> Path:
        return self.root / "runs" / f"f{float(fraction):g}" / f"seed{int(seed)}"

    def predictions(self, fraction: float, seed: int) -> Path:
        return self.unit(fraction, seed) / PREDICTIONS

    def manifest(self, fraction: float, seed: int) -> Path:
        return self.unit(fraction, seed) / "manifest.csv"

    def work(self, fraction: float, seed: int) -> Path:
        return self.unit(fraction, seed) / "work"

    def stage1(self, fraction: float, seed: int) -> Path:
        """The projector aligned on the unit's patient subset."""
        return self.unit(fraction, seed) / "stage1"

    @property
    def summary(self) -> Path:
        return self.root / "data_efficiency.json"

    @property
    def table(self) -> Path:
        return self.root / "data_efficiency.md"


@dataclass(frozen=True)
class RunLayout:
    """The folders and files of one evaluation run under ``root`` (``EvaluateConfig.out_dir``)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    config = property(lambda self: self.root / "config.yaml")
    provenance = property(lambda self: self.root / "provenance.json")
    results_csv = property(lambda self: self.root / "results.csv")
    results_json = property(lambda self: self.root / "results.json")
    results_md = property(lambda self: self.root / "results.md")
    report = property(lambda self: self.root / "report.html")
    figures = property(lambda self: self.root / "figures")
    textcheck = property(lambda self: self.root / "textcheck.json")

    def predictions(self, system: str, seed: int) -> Path:
        return self.root / "predictions" / system / f"seed{int(seed)}.csv"

    def work(self, system: str, seed: int) -> Path:
        return self.root / "work" / system / f"seed{int(seed)}"

    def stage1(self, seed: int) -> Path:
        """Stage 1 (``respiramfm align``) of ``seed`` when the run aligns per seed."""
        return self.root / "stage1" / f"seed{int(seed)}"

    @property
    def stage1_manifest(self) -> Path:
        """The run's records as one manifest (stage 1 reads one) when the run has several."""
        return self.root / "stage1" / "manifest.csv"

    def finetune_run(self, system: str, seed: int, custom: str = "") -> Path:
        """The stage-2 run of a unit (a shared ``finetune_dir`` option when the config names one)."""
        return finetune_dir(self.work(system, seed), custom, seed)

    def efficiency(self, system: str) -> EfficiencyLayout:
        return EfficiencyLayout(self.root / "efficiency" / system)

    def efficiency_summaries(self) -> list[Path]:
        return sorted((self.root / "efficiency").glob("*/data_efficiency.json"))

    def figure(self, name: str) -> Path:
        return self.figures / f"{name}.png"


__all__ = ["EfficiencyLayout", "FINETUNE", "RunLayout", "finetune_dir"]
