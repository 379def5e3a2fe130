"""``respiramfm merge A.csv B.csv ... --out M.csv``: several manifests -> one, checked.

Every stage that reads records takes one manifest; merging is how records of several
datasets (or of several ``prepare`` runs) reach one training run. The merge refuses what
would silently corrupt an experiment:

* a record id present in two inputs (the same recording prepared twice);
* a patient whose records sit in different splits across the inputs (patient leakage);
* a patient id shared by two datasets (ids carry the dataset prefix, so this means two
  inputs disagree about who a patient is).

Audio paths are rewritten relative to the merged manifest's folder, so the result stays
usable wherever the inputs were. ``--zero-shot DATASET`` moves every record of a dataset
into the test split (a dataset used only for zero-shot tasks never reaches training; every
training stage refuses one that does, see :mod:`respiramfm.data.roles`).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from respiramfm.data.records import read_manifest, relative_audio_path, resolve_audio_path, write_manifest
from respiramfm.data.roles import as_test_only
from respiramfm.data.splits import check_no_leakage
from respiramfm.errors import DataError


def merge_manifests(paths: list[Path], out: Path, zero_shot: tuple[str, ...] = ()) -> list:
    """Merge ``paths`` into ``out`` (see the module docstring); returns the merged records."""
    merged, origin = [], {}
    datasets_of: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        for r in read_manifest(path):
            if r.record_id in origin:
                raise DataError(f"record {r.record_id!r} is in both {origin[r.record_id]} and {path}", path=path)
            origin[r.record_id] = path
            if r.audio_path:
                r.audio_path = relative_audio_path(resolve_audio_path(r, Path(path).parent), out)
            datasets_of[r.patient_id].add(r.dataset)
            merged.append(r)
    shared = sorted(p for p, ds in datasets_of.items() if len(ds) > 1)
    if shared:
        raise DataError(f"patient id(s) {shared[:5]} appear under several datasets", path=out)
    unknown = sorted(set(zero_shot) - {r.dataset for r in merged})
    if unknown:
        raise DataError(f"--zero-shot names dataset(s) {unknown} that no input holds", path=out)
    merged = as_test_only(merged, zero_shot)
    check_no_leakage(merged, out)
    write_manifest(merged, out)
    return merged


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("manifests", nargs="+", type=Path, help="manifest CSVs to merge")
    parser.add_argument("--out", type=Path, required=True, help="merged manifest to write")
    parser.add_argument("--zero-shot", action="append", default=[], metavar="DATASET",
                        help="put every record of this dataset in the test split (repeatable)")


def run(args: argparse.Namespace) -> int:
    records = merge_manifests(args.manifests, args.out, tuple(args.zero_shot))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        counts[r.dataset][r.split or "unassigned"] += 1
    parts = [f"{d}: " + ", ".join(f"{k}={v}" for k, v in sorted(c.items())) for d, c in sorted(counts.items())]
    print(f"{len(records)} records from {len(args.manifests)} manifest(s) -> {args.out} ({'; '.join(parts)})")
    return 0
