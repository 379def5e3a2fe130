"""Micro-batching: concurrent requests share forward passes and get the one-at-a-time answers."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from respiramfm.errors import ConfigError
from respiramfm.serve.batcher import MicroBatcher
from respiramfm.serve.engine import Engine, InputError

SAME = ("task", "disease", "modalities_used", "model", "warnings")
SYMPTOMS = ["dry cough", "wheezing and shortness of breath", "fever, chills", "no symptoms", "tightness in the chest"]


def test_batcher_groups_jobs_and_isolates_a_failing_one():
    calls = []

    def run(jobs):
        calls.append(list(jobs))
        if "bad" in jobs:
            raise ValueError("bad job")
        return [j * 10 for j in jobs]

    batcher = MicroBatcher(run, window_ms=300, max_batch=8)
    start = threading.Barrier(8)

    def submit(j):
        start.wait()
        return batcher.submit(j)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(submit, range(8)))
    assert results == [j * 10 for j in range(8)]  # each caller gets its own job's result
    assert max(batcher.batches) > 1 and sum(batcher.batches) == 8

    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher.submit, j) for j in (1, "bad", 2)]
        with pytest.raises(ValueError, match="bad job"):
            futures[1].result()
        assert futures[0].result() == 10 and futures[2].result() == 20
    batcher.close()
    assert not batcher._worker.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(3)
    with pytest.raises(ConfigError):
        MicroBatcher(run, window_ms=-1)


def test_window_closes_early_when_the_batch_is_full():
    batcher = MicroBatcher(lambda jobs: jobs, window_ms=30_000, max_batch=4)
    t0 = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(batcher.submit, range(4))) == [0, 1, 2, 3]
    assert time.monotonic() - t0 < 20  # not the 30-s window: the fourth job filled the batch
    assert batcher.batches == [4]
    batcher.close()


def _requests(recordings):
    reqs = []
    for i in range(12):
        kw = {"task": ["T4", "T5", "T6", "T7", "T8"][i % 5]}
        if i % 4 == 3:
            kw["metadata"] = {"age": 30 + i, "sex": "female" if i % 2 else "male", "symptoms": ["cough"]}
        elif i % 7 != 6:
            kw["symptoms"] = SYMPTOMS[i % 5]
        kw["audio"] = None if i % 6 == 5 else recordings[i % len(recordings)]
        reqs.append(kw)
    return reqs


def test_batched_engine_answers_equal_one_at_a_time(predictor, recordings):
    engine = Engine(predictor, batch_window_ms=250, max_batch=16)
    reqs = _requests(recordings)
    want = [predictor.predict(audio_path=r["audio"], symptoms=r.get("symptoms"), metadata=r.get("metadata"),
                              task=r["task"]) for r in reqs]

    def send(r):
        audio = r["audio"]
        return engine.predict(audio.read_bytes() if audio else None, audio.name if audio else None, r["task"],
                              r.get("symptoms"), json.dumps(r["metadata"]) if "metadata" in r else None)

    with ThreadPoolExecutor(len(reqs)) as pool:
        got = list(pool.map(send, reqs))
    assert max(engine.batcher.batches) > 1, engine.batcher.batches  # requests really shared passes
    assert len({w["probability"] for w in want}) == len(reqs)  # the inputs really differ
    for i, (g, w) in enumerate(zip(got, want)):
        assert g["probability"] == pytest.approx(w["probability"], abs=1e-5), i
        assert {k: g[k] for k in SAME} == {k: w[k] for k in SAME}, i
    assert len(engine._batched.prefix_caches) >= 5  # one KV cache per distinct prompt, kept across batches
    # Attribution still takes the one-at-a-time path; bad input is still the client's own error.
    n_batches = len(engine.batcher.batches)
    att = engine.predict(reqs[0]["audio"].read_bytes(), "a.wav", "T4", "dry cough", attribution=True)
    ref = predictor.predict(audio_path=reqs[0]["audio"], symptoms="dry cough", task="T4", attribution=True)
    assert att["probability"] == ref["probability"] and att["attention"]["tokens"] == ref["attention"]["tokens"]
    assert len(engine.batcher.batches) == n_batches
    with pytest.raises(InputError, match="no_input|nothing"):
        engine.predict(None, None, "T4")
    engine.batcher.close()
