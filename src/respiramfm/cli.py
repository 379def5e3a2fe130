"""The single ``respiramfm`` command; one subcommand per pipeline stage.

Each subcommand lives in the module that implements its stage and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported only
when their subcommand runs, so ``respiramfm --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from respiramfm import __version__
from respiramfm.errors import RespiraMFMError

# name -> (module, one-line help). Order is the data flow.
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("respiramfm.data.prepare", "turn a raw dataset (or the simulated cohort) into a records manifest"),
    "tasks": ("respiramfm.data.tasks_cli", "list every task (built-in and from --task-file) with its labels, role and prompt"),
    "merge": ("respiramfm.data.merge", "merge several manifests into one (leakage-checked; --zero-shot DATASET)"),
    "fetch-opera": ("respiramfm.encoders.fetch", "download the released OPERA-CT checkpoint (explicit, needs network)"),
    "pretrain-audio": ("respiramfm.encoders.pretrain", "OPERA-style contrastive pretraining of an HTS-AT encoder"),
    "embed": ("respiramfm.encoders.store", "compute and cache audio embeddings for a manifest"),
    "embed-text": ("respiramfm.llm.text_store", "compute and cache frozen-LLM text targets for a manifest"),
    "align": ("respiramfm.align.train", "stage 1: contrastive audio-text alignment of the projector"),
    "finetune": ("respiramfm.fusion.train", "stage 2: LLM fusion fine-tuning with LoRA and a linear head"),
    "predict": ("respiramfm.fusion.predict", "probability of a condition for one recording (or a manifest)"),
    "evaluate": ("respiramfm.evaluate.cli", "run the T1-T9 protocol with baselines over seeds; write tables and the report"),
    "audit": ("respiramfm.evaluate.audit", "how well each metadata field alone predicts a task's label (shortcuts)"),
    "serve": ("respiramfm.serve.app", "HTTP prediction API and web page for a saved model"),
    "demo": ("respiramfm.demo", "run the whole pipeline end to end on the embedded offline defaults"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="respiramfm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"respiramfm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_) in COMMANDS.items():
        sub.add_parser(name, help=help_, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv)  # prints help / version / error
        parser.print_help()
        return 2
    name = argv[0]
    module = importlib.import_module(COMMANDS[name][0])
    sub = argparse.ArgumentParser(prog=f"respiramfm {name}", description=COMMANDS[name][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        return int(module.run(args) or 0)
    except RespiraMFMError as exc:
        print(f"respiramfm {name}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
