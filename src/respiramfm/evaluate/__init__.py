"""The evaluation protocol (``respiramfm evaluate``), in pieces that import one way only.

``budget`` (the one training budget of every system) -> ``config`` (EvaluateConfig) -> ``data`` (EvalData, loading, the no-test-patient guard) ->
``registry`` (which systems exist; a leaf: systems are imported by name when asked for) ->
``systems`` / ``baselines`` / ``qwen2audio`` (the systems) -> ``layout`` (every file name of a run) ->
``predictions`` (the one prediction format) -> ``efficiency`` (data-efficiency retraining) ->
``results`` (tables) -> ``report`` (HTML) -> ``protocol`` (orchestration) -> ``cli`` (the command).
"""
