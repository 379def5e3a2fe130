"""One self-contained HTML report of an evaluation directory (``OUT/report.html``).

Everything is inline: figures are base64 PNGs (also written to ``OUT/figures/``), styles
are in the page, nothing is fetched. Sections: results table with CIs, ROC curves per
task, embeddings before/after alignment (the t-SNE figure `respiramfm align` wrote),
attention over context tokens for a few test patients, the data-efficiency curves (every
``OUT/efficiency/SYSTEM/``), configuration and provenance. Every path comes from
:class:`respiramfm.evaluate.layout.RunLayout`. Simulated results are
labelled SIMULATED in the page title, every table and every figure.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path

import numpy as np
import torch

from respiramfm.config import load_config
from respiramfm.errors import DataError
from respiramfm.evaluate import report_figures as figs
from respiramfm.evaluate.budget import budget_markdown, budget_rows
from respiramfm.evaluate.config import EvaluateConfig
from respiramfm.evaluate.data import load_eval_data
from respiramfm.evaluate.layout import RunLayout
from respiramfm.evaluate.operating import operating_table
from respiramfm.evaluate.paired import differences_markdown
from respiramfm.evaluate.predictions import read_predictions
from respiramfm.evaluate.results import SIM_NOTE, markdown_table
from respiramfm.evaluate.systems import input_processor
from respiramfm.models.fusion import RespiraMFM
from respiramfm.utils.io import atomic_write_text

STYLE = """body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #bbb;padding:3px 7px}
.sim{background:#fde2e2;border:2px solid #c00;padding:6px;font-weight:bold}
img{max-width:100%;margin:4px}pre{background:#f4f4f4;padding:8px;font-size:11px;overflow-x:auto}"""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _md_table_to_html(md: str) -> str:
    """The results.md table as HTML (pipes -> cells; other lines -> paragraphs)."""
    out, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{html.escape(c).replace('**', '')}</{tag}>" for c in cells) + "</tr>")
        else:
            if in_table:
                out.append("</table>")
                in_table = False
            if line.strip():
                out.append(f"<p>{html.escape(line).replace('**', '')}</p>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)


def _task_curves(layout: RunLayout, summary: dict) -> dict[str, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``{task: {system: (labels, probs)}}`` of the first seed's predictions."""
    seed = min(summary["seeds"])
    preds = {system: read_predictions(layout.predictions(system, seed)) for system in summary["systems"]
             if layout.predictions(system, seed).is_file()}
    out = {}
    for task in summary["tasks"]:
        curves = {}
        for system, rows in preds.items():
            rs = [r for r in rows if r["task"] == task]
            if rs:
                curves[system] = (np.array([r["label"] for r in rs]), np.array([r["prob"] for r in rs]))
        if curves:
            out[task] = curves
    return out


def _roc_figures(layout: RunLayout, summary: dict, kind: str = "roc") -> list[Path]:
    """One ROC (``kind="roc"``) or reliability (``"reliability"``) figure per task, first seed."""
    draw = figs.roc_figure if kind == "roc" else figs.reliability_figure
    sim = {r["task"]: r["simulated"] for r in summary["rows"]}
    return [draw(task, curves, layout.figure(f"{kind}_{task}"), sim.get(task, False),
                 subtitle=f"(seed {min(summary['seeds'])})")
            for task, curves in _task_curves(layout, summary).items()]


def attention_examples(model_dir: Path, out: Path, n: int = 3) -> list[dict]:
    """Attribution for ``n`` test records of the first supervised task with a context."""
    layout = RunLayout(out)
    cfg = load_config(EvaluateConfig, layout.config, [])
    data = load_eval_data(cfg)
    preds_path = layout.predictions("respiramfm", min(cfg.seeds))
    probs = {(r["task"], r["record_id"]): r["prob"] for r in read_predictions(preds_path)} if preds_path.is_file() else {}
    model = RespiraMFM.from_pretrained(model_dir)
    processor = input_processor(model, data.audio_store)
    picked: list[dict] = []
    for task_name in data.supervised:
        task = data.tasks[task_name]
        pairs = [(r, y) for r, y in task.select(data.split("test")) if (task_name, r.record_id) in probs]
        pos = [p for p in pairs if p[1] == 1][: (n + 1) // 2]
        neg = [p for p in pairs if p[1] == 0][: n - len(pos)]
        for rec, y in pos + neg:
            item, _why = processor.record_item(task, rec, use_audio=model.cfg.mode != "text_only")
            if item is None:
                continue
            with torch.no_grad():
                att = model.attention_attribution(item)
            if att["tokens"]:
                picked.append({"task": task_name, "record_id": rec.record_id, "label": y,
                               "prob": probs[(task_name, rec.record_id)], "attribution": att})
        if picked:
            break
    return picked


def _efficiency_curves(layout: RunLayout) -> dict | None:
    """Every data-efficiency curve of the run (``OUT/efficiency/SYSTEM/``), merged for one plot."""
    paths = layout.efficiency_summaries()
    if not paths:
        return None
    merged: dict = {"systems": {}, "seeds": []}
    for path in paths:
        eff = json.loads(path.read_text())
        for key in ("fractions", "metric", "unit"):
            merged.setdefault(key, eff.get(key))
        merged["simulated"] = merged.get("simulated", False) or bool(eff.get("simulated"))
        merged["seeds"] = sorted(set(merged["seeds"]) | set(eff.get("seeds") or []))
        for name, curve in eff["systems"].items():
            merged["systems"][name] = {**curve, "fractions": eff["fractions"]}
    return merged


def _model_dir(layout: RunLayout, summary: dict, prov: dict) -> Path | None:
    """The first seed's RespiraMFM model of the run, when it was kept."""
    seeds = summary["seeds"]
    if not seeds:
        return None
    custom = ((prov.get("config", {}).get("systems_options") or {}).get("respiramfm") or {}).get("finetune_dir")
    cand = layout.finetune_run("respiramfm", min(seeds), custom or "") / "model"
    return cand if cand.is_dir() else None


def _nan_rows(summary: dict) -> dict:
    """The summary with JSON nulls of the difference rows read back as NaN."""
    rows = [{**r, **{k: float("nan") if r.get(k) is None else r[k] for k in ("diff", "ci_low", "ci_high")}}
            for r in summary["differences"]]
    return {**summary, "differences": rows}


def _first_projector(config: dict, layout: RunLayout, seed: int) -> str:
    """The projector of the first seed of a run that aligned per seed (reused or trained under OUT/stage1)."""
    reuse = {str(k): v for k, v in (config.get("seed_projectors") or {}).items()}
    return reuse.get(str(seed)) or str(layout.stage1(seed))


def build_report(out_dir: str | os.PathLike, model_dir: str | os.PathLike | None = None,
                 alignment_figure: str | os.PathLike | None = None) -> Path:
    """Write ``OUT/report.html`` (and ``OUT/figures/*.png``); returns the HTML path."""
    layout = RunLayout(out_dir)
    out = layout.root
    if not layout.results_json.is_file():
        raise DataError("no results.json: run `respiramfm evaluate` first", path=str(out))
    summary = json.loads(layout.results_json.read_text())
    for r in summary["rows"]:
        for k in ("mean", "std", "ci_low", "ci_high"):
            r[k] = float("nan") if r[k] is None else r[k]
    for groups in summary["averages"].values():
        for a in groups.values():
            a["mean"] = float("nan") if a["mean"] is None else a["mean"]
            a["std"] = float("nan") if a["std"] is None else a["std"]
    prov = json.loads(layout.provenance.read_text()) if layout.provenance.is_file() else {}
    sim = bool(summary["simulated"])
    parts = [f"<h1>RespiraMFM evaluation{' — SIMULATED' if sim else ''}</h1>"]
    if sim:
        parts.append(f'<p class="sim">{SIM_NOTE}. Every table and figure below uses it.</p>')
    parts += ["<h2>Results</h2>", _md_table_to_html(markdown_table(summary))]
    shortcuts = (summary.get("shortcuts") or {}).get("warnings") or []
    if shortcuts:  # evaluate/audit.py: one metadata field alone predicts a task's label
        parts += ['<h2 class="sim">Shortcut warnings</h2>', "<ul>" + "".join(
            f"<li>{html.escape(w)}</li>" for w in shortcuts) + "</ul>",
            "<p>A system that reaches a similar AUROC may be reading the recording setup, not the disease "
            "(`respiramfm audit`; OUT/results.json holds every field's AUROC).</p>"]
    if summary.get("differences"):  # evaluate/paired.py
        ref = summary["differences"][0]["reference"]
        parts += [f"<h2>Paired differences to {html.escape(ref)}</h2>",
                  _md_table_to_html(differences_markdown(_nan_rows(summary)))]

    parts.append("<h2>ROC curves</h2>")
    parts += [_img(p, p.stem) for p in _roc_figures(layout, summary)]

    if any(r.get("operating") for r in summary["rows"]):  # evaluate/operating.py
        parts += ["<h2>Operating points</h2>", _md_table_to_html(operating_table(summary).split("\n", 3)[3]),
                  f"<p>{'SIMULATED data. ' if sim else ''}Reliability diagrams (first seed): fraction of positive "
                  "records against the mean predicted probability in each bin; the diagonal is perfect "
                  "calibration.</p>"]
        parts += [_img(p, p.stem) for p in _roc_figures(layout, summary, kind="reliability")]

    align_fig = Path(alignment_figure) if alignment_figure else None
    if align_fig is None and prov.get("config", {}).get("stage1_per_seed") and summary["seeds"]:
        align_fig = Path(_first_projector(prov["config"], layout, min(summary["seeds"]))) / "tsne.png"
    if align_fig is None and prov.get("config", {}).get("projector"):
        align_fig = Path(prov["config"]["projector"]) / "tsne.png"
    if align_fig is not None and align_fig.is_file():
        dest = layout.figure("alignment_tsne")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(align_fig.read_bytes())
        parts += ["<h2>Embeddings before / after alignment (t-SNE, stage 1)</h2>",
                  f"<p>{'SIMULATED data. ' if sim else ''}Audio embeddings before the projector and after it, "
                  "coloured by label (from `respiramfm align`).</p>", _img(dest, "alignment t-SNE")]

    if model_dir is None:
        model_dir = _model_dir(layout, summary, prov)
    if model_dir is not None:
        examples = attention_examples(Path(model_dir), out)
        if examples:
            p = figs.attention_figure(examples, layout.figure("attention"), sim)
            parts += ["<h2>Attention over context tokens</h2>",
                      f"<p>{'SIMULATED data. ' if sim else ''}Model {html.escape(str(model_dir))}; test records "
                      + ", ".join(html.escape(e["record_id"]) for e in examples) + ".</p>", _img(p, "attention")]

    eff = _efficiency_curves(layout)
    if eff is not None:
        p = figs.efficiency_figure(eff, layout.figure("data_efficiency"))
        parts += ["<h2>Data efficiency</h2>",
                  f"<p>{'SIMULATED data. ' if sim else ''}{html.escape(', '.join(eff['systems']))} retrained "
                  "on nested fractions of the training patients; mean supervised test AUROC "
                  f"(seeds {html.escape(str(eff.get('seeds')))}).</p>", _img(p, "data efficiency")]

    budgets = budget_rows(layout, summary["systems"], summary["seeds"])  # evaluate/budget.py: budget.json per unit
    if any(r["record"] for r in budgets):
        parts += ["<h2>Training budget</h2>", _md_table_to_html(budget_markdown(budgets))]
    llm = llm_setting((prov.get("config") or {}).get("finetune") or {})
    if llm:
        parts += [f"<p><b>LLM depth and LoRA placement.</b> {html.escape(llm)}</p>"]

    parts += ["<h2>Configuration and provenance</h2>",
              f"<pre>{html.escape(json.dumps(prov, indent=1, sort_keys=True))}</pre>"]
    title = "RespiraMFM evaluation" + (" (SIMULATED)" if sim else "")
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(parts)}</body></html>")
    atomic_write_text(layout.report, page)
    return layout.report


def llm_setting(ft: dict) -> str:
    """One sentence: the depth and LoRA placement every LLM system of the run trained with (its stage-2 config)."""
    model = ft.get("model") or {}
    if not model.get("backbone"):
        return ""
    layers = int(model.get("num_layers") or 0)
    top = int((model.get("lora") or {}).get("top_layers") or 0)
    depth = f"its first {layers} decoder layers" if layers else "every decoder layer (full depth)"
    where = f"LoRA on the top {top} of them" if top else "LoRA on every one of them"
    cached = ("RespiraMFM and its fixed-input ablations trained through the frozen-trunk cache (the layers below "
              "the LoRA computed once per record); " if ft.get("trunk_cache") and top else "")
    return (f"Every LLM system used {model['backbone']} with {depth}, {where}; {cached}RespLLM and the no-alignment "
            "ablations train their projector, so they always run every kept layer uncached.")


__all__ = ["attention_examples", "build_report", "llm_setting"]
