"""``respiramfm prepare DATASET --root DIR --out FILE``: a raw dataset -> a records manifest.

DATASET is one of the adapters in :mod:`respiramfm.data.datasets` (icbhi, kauh,
coswara, coughvid, ukcovid19, codatb, generic) or ``simulated``, which is handed
to :mod:`respiramfm.data.simulate` (its own options; see ``prepare simulated -h``).

The command never stops at the first bad item: records it cannot build, audio files
that are missing and metadata disagreements are written to a report (``FILE`` +
``.report.txt`` unless ``--report`` says otherwise), and every other record reaches
the manifest. By default patient-level splits are assigned (official splits kept, a
validation split carved from official training patients); ``--splits keep`` leaves
the adapter's splits as they are. Audio paths are stored relative to the manifest.

``--role zero-shot`` puts every record in the test split: the one role of a dataset that the
run uses only for zero-shot tasks (KAUH, Coswara and CODA TB for the paper's T5-T9). Training
stages refuse such a dataset's records anywhere else (:mod:`respiramfm.data.roles`).
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from respiramfm.data.datasets import ADAPTERS
from respiramfm.data.datasets.generic import FIELD_HELP as GENERIC_FIELDS
from respiramfm.data.records import relative_audio_path, write_manifest
from respiramfm.data.roles import as_test_only, zero_shot_only
from respiramfm.data.splits import assign_splits, check_no_leakage
from respiramfm.data.task_defs import TASKS
from respiramfm.errors import ConfigError, DataError, RespiraMFMError
from respiramfm.utils.io import atomic_write_text

HELP = {
    "icbhi": "ICBHI 2017: ROOT holds the three official txt files and audio_and_txt_files/, or the cycle-segment "
             "layout (Crack/, Normal/, Wheeze/ with patient_diagnosis.csv and demographic_info.txt); detected",
    "kauh": "KAUH lung sounds (ROOT holds AudioFiles/, 'Audio Files/' or 'Audio Files Test/', or name it with "
            "--audio-dir; optionally 'Data annotation.xlsx')",
    "coswara": "Coswara (ROOT holds combined_data.csv and optionally Extracted_data/)",
    "coughvid": "Coughvid (ROOT holds metadata_compiled.csv and the <uuid>.webm/.ogg files)",
    "ukcovid19": "UK COVID-19 Vocal Audio (ROOT holds the three CSVs and audio/)",
    "codatb": "CODA TB DREAM Train portion (expected layout; see the adapter docstring)",
    "generic": "your own CSV, mapped with --columns",
}


def _fractions(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three numbers like 0.7,0.1,0.2, got {text!r}") from None
    if len(parts) != 3 or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative numbers like 0.7,0.1,0.2, got {text!r}")
    return parts  # type: ignore[return-value]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", required=True, type=Path, help="dataset folder as its publishers ship it")
    p.add_argument("--out", required=True, type=Path, help="manifest CSV to write")
    p.add_argument("--report", type=Path, default=None, help="problem report (default: OUT.report.txt)")
    p.add_argument("--splits", choices=("assign", "keep"), default="assign",
                   help="assign patient-level splits (default; official splits kept) or keep the adapter's")
    p.add_argument("--fractions", type=_fractions, default=(0.7, 0.1, 0.2), help="train,val,test (default 0.7,0.1,0.2)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default 0)")
    p.add_argument("--role", choices=ROLE_CHOICES, default="supervised",
                   help="zero-shot: every record goes to the test split (a dataset used only for zero-shot "
                        "tasks, e.g. KAUH, Coswara, CODA TB for T5-T9); supervised (default): --splits decides")


ROLE_CHOICES = ("supervised", "zero-shot")


def role_note(records: list, role: str) -> str:
    """A hint when a dataset the paper tasks use only zero-shot is prepared with training splits."""
    if role == "zero-shot":
        return ""
    only = sorted({r.dataset for r in records} & set(zero_shot_only(TASKS)))
    return "".join(f"note: {d} serves only zero-shot paper tasks; training stages refuse its train/val rows "
                   f"unless a task file gives it a supervised task (prepare it with --role zero-shot)\n"
                   for d in only)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="source", metavar="DATASET", required=True)
    for name in ADAPTERS:
        p = sub.add_parser(name, help=HELP[name], description=HELP[name])
        _common(p)
        if name == "coswara":
            p.add_argument("--modality", default="cough-shallow", help="recording to use (default cough-shallow)")
        elif name == "ukcovid19":
            p.add_argument("--modality", default="cough",
                           help="comma list of cough, three_cough, exhalation, sentence (default cough)")
        elif name == "kauh":
            p.add_argument("--audio-dir", default=None,
                           help="audio folder, relative to ROOT or absolute (default: the first of AudioFiles, "
                                "'Audio Files', 'Audio Files Test')")
        elif name == "generic":
            p.add_argument("--csv", default=None, help="metadata CSV (default ROOT/metadata.csv, or ROOT itself)")
            p.formatter_class = argparse.RawDescriptionHelpFormatter
            p.epilog = "fields --columns can map (a field whose name is a CSV column maps itself; other " \
                       "columns are kept in extra):\n" + "\n".join(
                           f"  {k:<16} {v}" for k, v in GENERIC_FIELDS.items())
            p.add_argument("--columns", default="", help="field=column,... e.g. record_id=file,diagnosis=label "
                                                         "(fields listed below)")
            p.add_argument("--dataset", dest="dataset_name", required=True, help="dataset name for the records")
            p.add_argument("--diagnosis-map", default="", help="raw=canonical,... e.g. 1=tb,0=non-tb")
            p.add_argument("--labels", default="", help="allowed diagnoses (comma list); others are reported")
            p.add_argument("--audio-type", default="", help="audio type when no column gives it (e.g. cough, lung)")
    sim = sub.add_parser("simulated", help="the simulated cohort (respiramfm.data.simulate)")
    try:
        from respiramfm.data import simulate
    except Exception as exc:  # keep every real adapter usable whatever happens to the simulator
        sim.set_defaults(simulate_error=f"{type(exc).__name__}: {exc}")
    else:
        simulate.add_arguments(sim)


def _options(args: argparse.Namespace) -> dict:
    if args.source in ("coswara", "ukcovid19"):
        return {"modality": args.modality}
    if args.source == "kauh":
        return {"audio_dir": args.audio_dir}
    if args.source == "generic":
        return {"csv": args.csv, "columns": args.columns, "dataset": args.dataset_name,
                "diagnosis_map": args.diagnosis_map, "labels": args.labels, "audio_type": args.audio_type}
    return {}


def _report_text(args, records, problems: list[str]) -> str:
    with_audio = sum(1 for r in records if r.audio_path)
    lines = [
        f"respiramfm prepare {args.source}",
        f"root: {args.root}",
        f"manifest: {args.out}",
        f"role: {getattr(args, 'role', 'supervised')}",
        f"records: {len(records)} (with audio {with_audio}, metadata-only {len(records) - with_audio})",
        f"patients: {len({(r.dataset, r.patient_id) for r in records})}",
        "splits: " + ", ".join(f"{k or 'unassigned'}={v}" for k, v in sorted(Counter(r.split for r in records).items())),
        "diagnoses: " + ", ".join(f"{k or 'unlabelled'}={v}"
                                   for k, v in sorted(Counter(r.diagnosis for r in records).items())),
        f"problems: {len(problems)}",
    ]
    return "\n".join(lines + problems) + "\n"


def prepare(args: argparse.Namespace) -> tuple[list, list[str], Path]:
    """Run one adapter and write manifest and report; returns (records, problems, report path)."""
    out: Path = args.out
    report = args.report or out.with_name(out.name + ".report.txt")
    if not args.root.exists():
        raise DataError("dataset root not found", path=args.root)
    result = ADAPTERS[args.source](args.root, **_options(args))
    records, problems = result.records, list(result.problems)
    if not records:
        atomic_write_text(report, _report_text(args, records, problems))
        raise DataError(f"no records could be built (see {report})", path=args.root)
    if getattr(args, "role", "supervised") == "zero-shot":
        records = as_test_only(records)
    elif args.splits == "assign":
        records = assign_splits(records, fractions=args.fractions, seed=args.seed, keep_existing=True)
    check_no_leakage(records)
    for r in records:
        if r.audio_path:
            r.audio_path = relative_audio_path(r.audio_path, out)
    write_manifest(records, out)
    atomic_write_text(report, _report_text(args, records, problems))
    return records, problems, report


def run(args: argparse.Namespace) -> int:
    if args.source == "simulated":
        err = getattr(args, "simulate_error", None)
        if err:
            raise ConfigError(f"the simulated cohort is unavailable ({err})")
        from respiramfm.data import simulate

        return int(simulate.run(args) or 0)
    try:
        records, problems, report = prepare(args)
    except OSError as exc:  # e.g. an unwritable output folder
        raise RespiraMFMError(f"cannot write output: {exc.strerror}", path=exc.filename) from None
    with_audio = sum(1 for r in records if r.audio_path)
    print(role_note(records, getattr(args, "role", "supervised")), end="")
    print(f"{args.source}: {len(records)} records ({with_audio} with audio) -> {args.out}; "
          f"{len(problems)} problem(s) listed in {report}")
    return 0
