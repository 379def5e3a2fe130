"""One training engine for every trained system (see :mod:`respiramfm.training.engine`).

* :mod:`~respiramfm.training.config`: :class:`Budget` / :class:`OptimConfig` (what decides the
  result) and :class:`RunSettings` (where and how it runs); no torch import;
* :mod:`~respiramfm.training.optim`: optimiser and learning-rate schedules;
* :mod:`~respiramfm.training.checkpoint`: the one resumable checkpoint format;
* :mod:`~respiramfm.training.callbacks`: selection with patience, metrics log, progress;
* :mod:`~respiramfm.training.engine`: :class:`TrainTask` and :class:`Trainer`.
"""

from respiramfm.training.config import Budget, OptimConfig, RunSettings

__all__ = ["Budget", "OptimConfig", "RunSettings"]
