"""One pipeline recipe (prepare -> embed -> embed-text -> align -> finetune -> evaluate) and its presets.

:mod:`~respiramfm.pipeline.config` (the typed settings), :mod:`~respiramfm.pipeline.recipe`
(the stage calls), :mod:`~respiramfm.pipeline.presets` (the simulated demo and the real-data
run), :mod:`~respiramfm.pipeline.threads` (CPU threads under shared cores).
"""
