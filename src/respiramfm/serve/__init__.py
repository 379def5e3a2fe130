"""Serving a saved model: an HTTP prediction API and an offline web page (``respiramfm serve``).

* :mod:`respiramfm.serve.engine` -- request checks and thread-safe inference on a
  loaded :class:`~respiramfm.fusion.predict.Predictor`, uploads decoded in memory;
* :mod:`respiramfm.serve.app` -- the FastAPI app (:func:`create_app`) and the CLI;
* :mod:`respiramfm.serve.guards` -- what protects it: body size and time limits,
  the Origin/Host policy, security headers and relative redirects, header and
  keep-alive timeouts and a connection cap (uvicorn), the research-use notice;
* :mod:`respiramfm.serve.client` -- a dependency-free multipart client for scripts,
  tests and the benchmark;
* :mod:`respiramfm.serve.tiny` -- a randomly initialised model directory for tests
  and benchmarks when no trained model is at hand.

FastAPI and uvicorn are imported only here, so the rest of the package works without them.
"""

from __future__ import annotations


def create_app(*args, **kwargs):
    """See :func:`respiramfm.serve.app.create_app` (imported lazily: FastAPI is only needed for serving)."""
    from respiramfm.serve.app import create_app as _create

    return _create(*args, **kwargs)


__all__ = ["create_app"]
