"""The text-target store: dedupe, reuse, resume, read-back by record id, error reporting, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from respiramfm import cli
from respiramfm.data.records import Record, write_manifest
from respiramfm.errors import ConfigError, DataError
from respiramfm.llm import text_embed
from respiramfm.llm.text_store import (TextTargetStore, embed_manifest, embed_texts, read_text_targets,
                                       text_key)


@pytest.fixture
def manifest(tmp_path, contexts):
    """Eight records over five distinct contexts, one record with an empty context."""
    ctx = [contexts[0], contexts[1], contexts[1], contexts[2], contexts[3], contexts[1], "", contexts[4]]
    records = [Record(record_id=f"r{i}", patient_id=f"p{i // 2}", dataset="demo", context=c, split="train")
               for i, c in enumerate(ctx)]
    return write_manifest(records, tmp_path / "manifest.csv"), ctx


@pytest.fixture
def counting(monkeypatch):
    """Count the texts that reach the LLM."""
    seen: list[str] = []
    real = text_embed.text_targets

    def wrapper(backbone, texts, *a, **k):
        seen.extend(texts)
        return real(backbone, texts, *a, **k)

    monkeypatch.setattr(text_embed, "text_targets", wrapper)
    return seen


def test_dedupe_readback_and_errors(tiny, manifest, tmp_path, counting):
    path, ctx = manifest
    bb = tiny("llama")
    out = tmp_path / "targets"
    report = embed_manifest(path, out, bb, chunk_size=2)
    assert report["records"] == 8 and report["errors"] == 1
    assert report["unique_texts"] == 6 and report["computed"] == 5 and report["reused"] == 0
    assert sorted(counting) == sorted(set(c for c in ctx if c))  # each distinct text computed once

    store = TextTargetStore(out)
    assert store.dim == 64 and store.meta["space"] == "hidden_mean" and store.meta["max_tokens"] == 125
    assert store.ids == ["r0", "r1", "r2", "r3", "r4", "r5", "r7"]
    assert store.errors == {"r6": "empty context"}
    assert "r6" not in store and "r1" in store and len(store) == 7
    expected = text_targets_np(bb, [c for c in ctx if c])
    ids, arr = read_text_targets(out)
    assert ids == store.ids and arr.dtype == np.float32 and arr.shape == (7, 64)
    np.testing.assert_allclose(arr, expected, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(store.get("r1"), store.get("r5"))
    np.testing.assert_array_equal(store.get_text(ctx[3]), store.get("r3"))
    assert store.has_text(ctx[4]) and not store.has_text(ctx[4] + " ") and not store.has_text("")
    with pytest.raises(DataError, match="no text target for this text"):
        store.get_text("never embedded")
    ids, sub = read_text_targets(out, ["r7", "r0"])
    assert ids == ["r7", "r0"]
    np.testing.assert_array_equal(sub[1], store.get("r0"))
    with pytest.raises(DataError, match="empty context"):
        store.get("r6")
    with pytest.raises(DataError, match="not in this store"):
        read_text_targets(out, ["nope"])
    errors_tsv = (out / "errors.tsv").read_text().splitlines()
    assert errors_tsv == ["record_id\treason", "r6\tempty context"]


def text_targets_np(bb, texts):
    return text_embed.text_targets(bb, texts).numpy()


def test_rerun_recomputes_nothing_and_new_texts_only(tiny, manifest, tmp_path, counting, contexts):
    path, _ = manifest
    bb = tiny("qwen2")
    out = tmp_path / "targets"
    embed_manifest(path, out, bb)
    before = read_text_targets(out)[1]
    counting.clear()
    again = embed_manifest(path, out, bb)
    assert counting == [] and again["computed"] == 0 and again["reused"] == 5
    np.testing.assert_array_equal(read_text_targets(out)[1], before)
    counting.clear()
    more = embed_texts(out, bb, [contexts[0], "Gender: male. Age: 41. Smoker: yes."])
    assert counting == ["Gender: male. Age: 41. Smoker: yes."] and more["computed"] == 1


def test_resume_after_interruption(tiny, manifest, tmp_path, monkeypatch):
    path, _ = manifest
    bb = tiny("gpt2")
    reference = embed_manifest(path, tmp_path / "ref", bb, chunk_size=2)
    real = text_embed.text_targets
    calls: list[list[str]] = []

    def dies_on_second_chunk(backbone, texts, *a, **k):
        calls.append(list(texts))
        if len(calls) == 2:
            raise KeyboardInterrupt  # the job is killed mid-run
        return real(backbone, texts, *a, **k)

    monkeypatch.setattr(text_embed, "text_targets", dies_on_second_chunk)
    out = tmp_path / "targets"
    with pytest.raises(KeyboardInterrupt):
        embed_manifest(path, out, bb, chunk_size=2)
    assert len(list((out / "cache").glob("shard-*.safetensors"))) == 1
    assert not list((out / "cache").glob(".*"))  # no half-written shard left behind
    assert not (out / "records.tsv").exists()

    calls.clear()
    monkeypatch.setattr(text_embed, "text_targets", _recording(real, calls))
    report = embed_manifest(path, out, bb, chunk_size=2)
    assert report["computed"] == 3 and report["reused"] == 2 == reference["computed"] - 3
    assert sum(len(c) for c in calls) == 3
    ids, arr = read_text_targets(out)
    ref_ids, ref = read_text_targets(tmp_path / "ref")
    assert ids == ref_ids
    np.testing.assert_allclose(arr, ref, atol=1e-5, rtol=0)


def _recording(fn, calls):
    def wrapper(backbone, texts, *a, **k):
        calls.append(list(texts))
        return fn(backbone, texts, *a, **k)

    return wrapper


def test_store_refuses_a_different_key(tiny, manifest, tmp_path):
    path, _ = manifest
    out = tmp_path / "targets"
    embed_manifest(path, out, tiny("llama"), space="input_mean")
    with pytest.raises(ConfigError, match=r"differs in \['space'\]"):
        embed_manifest(path, out, tiny("llama"), space="hidden_mean")
    with pytest.raises(ConfigError, match="max_tokens"):
        embed_manifest(path, out, tiny("llama"), space="input_mean", max_tokens=32)
    with pytest.raises(ConfigError, match="weights"):
        embed_manifest(path, out, tiny("llama", seed=9), space="input_mean")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["backbone"]["arch"] == "llama" and meta["weights"].startswith("state-sha256:")


def test_concurrent_writer_is_refused(tiny, tmp_path):
    from filelock import FileLock

    out = tmp_path / "targets"
    out.mkdir()
    with FileLock(str(out / ".lock")):
        with pytest.raises(ConfigError, match="another embed-text run"):
            embed_texts(out, tiny("llama"), ["Age: 3."])


def test_damaged_chunk_is_named(tiny, tmp_path):
    out = tmp_path / "targets"
    embed_texts(out, tiny("llama"), ["Age: 3.", "Age: 4."], chunk_size=1)
    bad = sorted((out / "cache").glob("shard-*.safetensors"))[1]
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match="damaged cache shard") as err:
        embed_texts(out, tiny("llama"), ["Age: 5."])
    assert err.value.path == str(bad)


def test_cli_with_local_backbone(tiny, manifest, tmp_path, capsys):
    path, ctx = manifest
    bb = tiny("phi", seed=2)
    bb.model.save_pretrained(tmp_path / "phi-tiny")
    bb.tokenizer.save_pretrained(tmp_path / "phi-tiny")
    out = tmp_path / "targets"
    argv = ["embed-text", "--manifest", str(path), "--out", str(out), "--backbone", str(tmp_path / "phi-tiny"),
            "--space", "last_token", "--max-tokens", "64", "--batch-size", "3"]
    assert cli.main(argv) == 0
    assert "8 records, 6 unique texts (5 computed, 0 reused), 1 errors" in capsys.readouterr().out
    store = TextTargetStore(out)
    assert store.meta["space"] == "last_token" and store.meta["max_tokens"] == 64
    want = text_embed.text_targets(bb, [ctx[3]], "last_token", max_tokens=64)[0].numpy()
    np.testing.assert_allclose(store.get("r3"), want, atol=1e-5, rtol=0)
    assert store.meta["backbone"]["weights"] == bb.identity()["weights"]
    assert cli.main(argv) == 0
    assert "(0 computed, 5 reused)" in capsys.readouterr().out
    assert cli.main(["embed-text", "--manifest", str(tmp_path / "missing.csv"), "--out", str(out),
                     "--backbone", str(tmp_path / "phi-tiny")]) == 1
    assert "manifest not found" in capsys.readouterr().err


def test_text_key_is_exact_text():
    assert text_key("Age: 3.") != text_key("Age: 3. ")
    assert text_key("") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_cli_num_layers_embeds_with_the_cut_llm_in_its_own_store(tiny, manifest, tmp_path, capsys):
    path, ctx = manifest
    bb = tiny("llama", num_layers=3, seed=4)
    bb.model.save_pretrained(tmp_path / "llama-tiny")
    bb.tokenizer.save_pretrained(tmp_path / "llama-tiny")
    base = ["embed-text", "--manifest", str(path), "--backbone", str(tmp_path / "llama-tiny"), "--batch-size", "4"]
    assert cli.main(base + ["--out", str(tmp_path / "cut"), "--num-layers", "1"]) == 0
    store = TextTargetStore(tmp_path / "cut")
    assert store.meta["backbone"]["layers"] == "first 1 of 3"
    want = text_embed.text_targets(tiny("llama", num_layers=3, seed=4).keep_first_layers(1), [ctx[3]],
                                   "hidden_mean")[0].numpy()
    np.testing.assert_allclose(store.get("r3"), want, atol=1e-5, rtol=0)
    full = text_embed.text_targets(bb, [ctx[3]], "hidden_mean")[0].numpy()
    assert not np.allclose(store.get("r3"), full, atol=1e-3)
    capsys.readouterr()
    # The same folder cannot silently mix depths: a full-depth run is refused.
    assert cli.main(base + ["--out", str(tmp_path / "cut")]) == 1
    assert cli.main(base + ["--out", str(tmp_path / "x"), "--num-layers", "-1"]) == 1
    assert "--num-layers >= 0" in capsys.readouterr().err
