"""Stage 2: training and using the RespiraMFM fusion classifier.

The model itself, its config and its saved format live in :mod:`respiramfm.models`
(``models.fusion``, ``models.configuration``, ``models.saved``); this package holds the
stage-2 data preparation, training loop, fast inference and the ``predict`` CLI. Import the
submodules directly, e.g. ``from respiramfm.fusion.predict import Predictor``.
"""
