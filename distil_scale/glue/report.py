"""A markdown table of GLUE runs beside the paper's BERT-base and DistilBERT columns, and a PNG
bar chart. Scores are the task's main metric × 100 (CoLA MCC, MRPC/QQP F1, STS-B Spearman, the
rest accuracy; MNLI matched), each with the majority-class baseline of the same run. A run whose
model is a pretraining export with its model card gets its score into the card's ``## GLUE``
section."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from ..errors import UserError
from ..model_card import get_section, is_distil_scale_card, update_section
from .tasks import DISPLAY, PAPER_ORDER, get_task

# DistilBERT paper (Sanh et al. 2019), Table 1, GLUE dev sets, medians of 5 seeds.
PAPER = {
    "BERT-base": {"cola": 56.3, "mnli": 86.7, "mrpc": 88.6, "qnli": 91.8, "qqp": 89.6,
                  "rte": 69.3, "sst2": 92.7, "stsb": 89.0, "wnli": 53.5, "macro": 79.5},
    "DistilBERT": {"cola": 51.3, "mnli": 82.2, "mrpc": 87.5, "qnli": 89.2, "qqp": 88.5,
                   "rte": 59.9, "sst2": 91.3, "stsb": 86.9, "wnli": 56.3, "macro": 77.0},
}


def find_results(paths: list[str]) -> list[Path]:
    """results.json files named directly, in the given directories, or below them (a multi-seed
    run's summary hides its seed_* runs)."""
    found = []
    for raw in paths:
        p = Path(raw)
        if p.is_file() and p.suffix == ".json":
            found.append(p)
        elif (p / "results.json").is_file():
            found.append(p / "results.json")
        elif p.is_dir():
            subs = sorted(q for q in p.rglob("results.json")
                          if not any(part.startswith("seed_") for part in q.parent.parts[-1:])
                          or not (q.parent.parent / "results.json").is_file())
            if not subs:
                raise UserError(f"report: no results.json in or below '{raw}'")
            found += subs
        else:
            raise UserError(f"report: no such run directory or results.json '{raw}'")
    return found


def load_runs(paths: list[str]) -> list[dict]:
    runs = []
    for f in find_results(paths):
        try:
            r = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"report: '{f}' is not valid JSON ({e.msg}, line {e.lineno})") from None
        missing = [k for k in ("task", "protocol", "metrics", "main_metric", "majority_baseline",
                               "model") if k not in r]
        if missing:
            raise UserError(f"report: '{f}' lacks {', '.join(missing)} (not a GLUE results.json)")
        r["_path"] = str(f)
        runs.append(r)
    return runs


def column_name(r: dict) -> str:
    name = Path(str(r["model"]).rstrip("/")).name
    if name == "model":  # <run>/model: name it after the run
        name = Path(str(r["model"]).rstrip("/")).parent.name
    if r.get("mode") == "distill":
        name += " (task-distilled)"
    return f"{name} [{r['protocol']}]"


def build_table(runs: list[dict]) -> tuple[str, dict]:
    """Markdown and the numbers behind it: {column: {task: (score, majority)}}."""
    cols: dict[str, dict] = {}
    for r in runs:
        task = get_task(r["task"]).name
        m = r["main_metric"]
        col = cols.setdefault(column_name(r), {})
        if task in col:
            print(f"warning: two runs of {task} for '{column_name(r)}'; using {r['_path']}",
                  file=sys.stderr)
        col[task] = (
            100 * r["metrics"][m], 100 * r["majority_baseline"].get(m, float("nan")), m,
            r.get("wall_s"), len(r["seeds"]) if "seeds" in r else 1)
    tasks = [t for t in PAPER_ORDER if any(t in c for c in cols.values())]
    head = ["task", "metric", "BERT-base (paper)", "DistilBERT (paper)"]
    for c in cols:
        head += [c, "majority"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in tasks:
        metric = next(c[t][2] for c in cols.values() if t in c)
        if t == "mnli":
            metric += " (m)"
        row = [DISPLAY[t], metric, f"{PAPER['BERT-base'][t]:.1f}", f"{PAPER['DistilBERT'][t]:.1f}"]
        for c in cols.values():
            row += [f"{c[t][0]:.1f}", f"{c[t][1]:.1f}"] if t in c else ["–", "–"]
        lines.append("| " + " | ".join(row) + " |")
    # macro over the tasks run, for every column alike (the paper's macro is over all nine)
    row = [f"macro ({len(tasks)} tasks)", "",
           f"{sum(PAPER['BERT-base'][t] for t in tasks) / len(tasks):.1f}",
           f"{sum(PAPER['DistilBERT'][t] for t in tasks) / len(tasks):.1f}"]
    for c in cols.values():
        if all(t in c for t in tasks):
            row += [f"{sum(c[t][0] for t in tasks) / len(tasks):.1f}",
                    f"{sum(c[t][1] for t in tasks) / len(tasks):.1f}"]
        else:
            row += ["–", "–"]
    lines.append("| " + " | ".join(row) + " |")
    notes = [
        "",
        "Scores ×100 on each run's report split (dev: the official dev set; carved: the carved "
        "test split). `majority`: the same metric for always predicting the training set's "
        "majority class (STS-B: the training mean), on the same split.",
        f"Paper columns: DistilBERT paper Table 1 (dev sets, median of 5 seeds); its 9-task "
        f"macro: BERT-base {PAPER['BERT-base']['macro']}, DistilBERT "
        f"{PAPER['DistilBERT']['macro']}.",
    ]
    return "\n".join(lines + notes) + "\n", {c: {t: v[:2] for t, v in d.items()}
                                             for c, d in cols.items()}


GLUE_NOTE = ("Scores ×100 on each run's report split (dev: the official dev set; carved: the "
             "carved test split), median over seeds; `majority`: always predicting the training "
             "set's majority class (STS-B: its mean), same split. Written by `launch/report.py`.")
GLUE_HEAD = ("task", "metric", "score", "majority", "protocol", "mode", "seeds")


def card_rows(r: dict) -> tuple[str, ...]:
    task = get_task(r["task"]).name
    m = r["main_metric"]
    return (DISPLAY[task], m + (" (m)" if task == "mnli" else ""), f"{100 * r['metrics'][m]:.1f}",
            f"{100 * r['majority_baseline'].get(m, float('nan')):.1f}", str(r["protocol"]),
            str(r.get("mode", "finetune")), str(len(r["seeds"]) if "seeds" in r else 1))


def update_model_cards(runs: list[dict]) -> list[Path]:
    """Each run whose model is a directory holding a distil-scale model card: its row goes into
    the card's ``## GLUE`` table (one row per task, protocol and mode; the others are kept)."""
    by_card: dict[Path, list[dict]] = {}
    for r in runs:
        card = Path(str(r["model"])).expanduser() / "README.md"
        if card.is_file():
            by_card.setdefault(card.resolve(), []).append(r)
    order = {DISPLAY[t]: i for i, t in enumerate(PAPER_ORDER)}
    updated = []
    for card, rs in by_card.items():
        text = card.read_text(encoding="utf-8")
        if not is_distil_scale_card(text):
            continue
        rows: dict[tuple, tuple] = {}
        for line in (get_section(text, "GLUE") or "").splitlines():
            cells = tuple(c.strip() for c in line.strip().strip("|").split("|"))
            if len(cells) == len(GLUE_HEAD) and cells[0] in order:
                rows[cells[0], cells[4], cells[5]] = cells
        for r in rs:
            row = card_rows(r)
            rows[row[0], row[4], row[5]] = row
        table = ["| " + " | ".join(GLUE_HEAD) + " |", "|" + "---|" * len(GLUE_HEAD)]
        table += ["| " + " | ".join(row) + " |"
                  for _, row in sorted(rows.items(), key=lambda kv: (order[kv[0][0]], kv[0][1:]))]
        card.write_text(update_section(text, "GLUE", "\n".join([GLUE_NOTE, "", *table])),
                        encoding="utf-8")
        updated.append(card)
    return updated


def bar_chart(numbers: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    tasks = [t for t in PAPER_ORDER if any(t in c for c in numbers.values())]
    series = [(k, [PAPER[k][t] for t in tasks], None) for k in PAPER]
    for c, d in numbers.items():
        series.append((c, [d[t][0] if t in d else np.nan for t in tasks],
                       [d[t][1] if t in d else np.nan for t in tasks]))
    x = np.arange(len(tasks))
    w = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(tasks) + 2), 4.2))
    for i, (name, vals, base) in enumerate(series):
        pos = x - 0.4 + w * (i + 0.5)
        ax.bar(pos, vals, w, label=name)
        if base is not None:
            ax.scatter(pos, base, marker="_", s=200, color="black", zorder=3,
                       label="majority baseline" if i == len(PAPER) else None)
    ax.set_xticks(x)
    ax.set_xticklabels([DISPLAY[t] for t in tasks])
    ax.set_ylabel("score ×100 (task's main metric)")
    ax.set_title("GLUE: runs beside the DistilBERT paper's dev-set numbers")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report_main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="report.py", description="GLUE runs -> markdown + PNG.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories (or results.json files, or folders holding runs)")
    p.add_argument("--out", default="runs/glue/report",
                   help="folder for report.md and report.png (default: runs/glue/report)")
    args = p.parse_args(argv)
    runs = load_runs(args.runs)
    md, numbers = build_table(runs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(md)
    bar_chart(numbers, out / "report.png")
    print(md)
    print(f"wrote {out / 'report.md'} and {out / 'report.png'}")
    for card in update_model_cards(runs):
        print(f"updated the GLUE section of {card}")
    return 0
