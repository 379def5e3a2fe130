"""Stage 1: align frozen audio embeddings to a frozen LLM's text embeddings with a trained projector.

Modules: :mod:`~respiramfm.models.projector` (the MLP, strict save/load),
:mod:`~respiramfm.align.losses` (InfoNCE, CLIP, duplicate-aware; distributed gather),
:mod:`~respiramfm.align.data` (cached pairs, patient-level train/val),
:mod:`~respiramfm.align.train` (``respiramfm align``), :mod:`~respiramfm.align.metrics`,
:mod:`~respiramfm.align.figures`; the training loop and its checkpoints are :mod:`respiramfm.training`.
Import the submodules directly; this package imports nothing heavy.
"""
