"""A miniature reproduction of the paper's Tables 1 and 4, on real data, on a CPU:
``python launch/study.py``.

From the demo's teacher (configs/demo.yaml), each variant pretrains a student with the same
step budget: the full triple loss with teacher initialisation, then without L_ce, without
L_cos, without L_mlm, and with random initialisation. Each is scored on held-out masked-token
accuracy and fine-tuned on GLUE dev sets (train subsets; median of seeds, with their spread).
Beside them: the teacher fine-tuned the same way, task-specific distillation with no
pretraining (a student cut from the teacher's layers, distilled on the task from the
fine-tuned teacher), and the majority class. Output: ``study.md`` (each variant's delta from the
full recipe and its share of the teacher's score, beside the paper's deltas) and ``study.png``.

Every cell (one pretraining run, one task × model) leaves its result file behind; a study run
again skips finished cells, so an interrupted study continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..assets import CONFIGS
from ..config import load_config
from ..errors import UserError, main_guard
from ..glue.config import load_glue_config
from ..glue.distill import distill_task
from ..glue.runner import finetune
from ..glue.tasks import get_task
from ..train import train

REPO = Path(__file__).resolve().parents[2]
DEMO = CONFIGS / "demo.yaml"
GLUE_DIR = REPO.parent / "shared" / "data" / "glue"


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: tuple = ()
    paper_delta: float | None = None  # Table 4: GLUE macro-score change from the full recipe


# Table 4 of Sanh et al. (2019): the ablations' GLUE macro-score deltas
VARIANTS = (
    Variant("full", "full recipe (L_ce + L_mlm + L_cos, teacher init)", (), 0.0),
    Variant("no_ce", "- L_ce (no soft-target KL)", ("loss.alpha_ce=0",), -2.96),
    Variant("no_cos", "- L_cos", ("loss.alpha_cos=0",), -1.46),
    Variant("no_mlm", "- L_mlm", ("loss.alpha_mlm=0",), -0.31),
    Variant("random_init", "random init (no teacher layers)", ("student.init=random",), -3.69),
)
TASK_DISTILL = "task_distill"
TEACHER = "teacher"


@dataclass(frozen=True)
class Budget:
    steps: int          # pretraining steps per variant
    seeds: int          # GLUE fine-tuning seeds per cell
    tasks: tuple
    max_train: int      # GLUE training examples per task (a fixed subset)
    epochs: int
    max_eval: int = 0   # 0: the whole dev set (the reported numbers)


DEFAULT = Budget(steps=80, seeds=3, tasks=("sst2", "mrpc", "cola", "rte"), max_train=600,
                 epochs=2)
QUICK = Budget(steps=20, seeds=1, tasks=("sst2", "rte"), max_train=200, epochs=1, max_eval=200)


# pretraining keys the study sets itself, and the flag that sets them
_STUDY_KEYS = {"run.output_dir": "--out", "train.max_steps": "--steps",
               "train.eval_every": "at the end of each run",
               "checkpoint.every_steps": "halfway and at the end"}


def _say(msg: str) -> None:
    print(f"study: {msg}", flush=True)


# -- pretraining ------------------------------------------------------------------------------
def pretrain_cell(out: Path, v: Variant, b: Budget, overrides: list[str]) -> dict:
    """One variant's pretraining run; its summary.json marks the cell finished."""
    done = out / "summary.json"
    if done.is_file():
        return json.loads(done.read_text())
    cfg = load_config(str(DEMO), [
        f"run.output_dir={out}", f"train.max_steps={b.steps}", f"train.eval_every={b.steps}",
        f"checkpoint.every_steps={max(1, b.steps // 2)}", "metrics.progress_bar=false",
        *v.overrides, *overrides])
    _say(f"pretraining '{v.name}' ({v.label}): {b.steps} steps -> {out}")
    # resume=True continues a cell that was interrupted, or starts it
    summary = train(cfg, resume=True)
    summary = {"variant": v.name, "acc_start": summary["acc_start"],
               "acc_end": summary["acc_end"], "teacher_acc": summary["teacher_acc"],
               "teacher": summary["teacher"], "steps": summary["steps"],
               "wall_s": round(summary["wall_s"], 1), "overrides": list(v.overrides)}
    done.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


# -- GLUE -------------------------------------------------------------------------------------
def _glue_cfg(task: str, b: Budget, out: Path, data_dir: str, save_model: bool,
              extra: tuple = ()):
    return load_glue_config(task, overrides=[
        f"run.output_dir={out}", f"run.seeds={b.seeds}", f"run.save_model={save_model}",
        f"data.data_dir={data_dir}", f"data.max_train_samples={b.max_train}",
        f"data.max_eval_samples={b.max_eval}", f"train.epochs={b.epochs}",
        "train.batch_size=16", "train.lr=1e-4", "train.progress_bar=false", *extra])


def _seed_scores(res: dict) -> list[float]:
    key = res["main_metric"]
    runs = res.get("seeds") or [res]
    return [r["metrics"][key] for r in runs]


def glue_cell(out: Path, what: str, run) -> dict:
    """One task × model (all its seeds); results.json marks the cell finished."""
    done = out / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    _say(what)
    return run()


def teacher_model_dir(cell: Path) -> Path:
    """The fine-tuned teacher a task-specific distillation learns from (its first seed)."""
    for d in (cell / "model", *sorted(cell.glob("seed_*/model"))):
        if (d / "config.json").is_file():
            return d
    raise UserError(f"--out: the fine-tuned teacher in '{cell}' has no saved model; delete "
                    f"'{cell}' and run the study again")


def run_study(out: Path, b: Budget, overrides: list[str], data_dir: str,
              student_layers: str) -> dict:
    t0 = time.time()
    pre = {v.name: pretrain_cell(out / "pretrain" / v.name, v, b, overrides) for v in VARIANTS}
    t_info = pre["full"]["teacher"]
    teacher = t_info.get("prepared_dir") or t_info["path"]
    glue: dict[str, dict[str, dict]] = {}
    for name in b.tasks:
        task = get_task(name)
        cells = glue.setdefault(name, {})
        tdir = out / "glue" / name / TEACHER
        cells[TEACHER] = glue_cell(tdir, f"{name}: fine-tuning the teacher", lambda: finetune(
            task, teacher, _glue_cfg(name, b, tdir, data_dir, save_model=True)))
        for v in VARIANTS:
            d = out / "glue" / name / v.name
            student = str(out / "pretrain" / v.name / "student")
            cells[v.name] = glue_cell(d, f"{name}: fine-tuning '{v.name}'", lambda: finetune(
                task, student, _glue_cfg(name, b, d, data_dir, save_model=False)))
        d = out / "glue" / name / TASK_DISTILL
        cells[TASK_DISTILL] = glue_cell(
            d, f"{name}: task-specific distillation from the fine-tuned teacher",
            lambda: distill_task(task, str(teacher_model_dir(tdir)), "init:teacher-layers",
                                 _glue_cfg(name, b, d, data_dir, save_model=False, extra=(
                                     f"distill.student_layers={student_layers}",))))
    return {"pretrain": pre, "glue": glue, "budget": b.__dict__, "wall_s": time.time() - t0}


# -- the table --------------------------------------------------------------------------------
def _pct(x: float) -> float:
    return 100.0 * x


def summarise(res: dict) -> dict:
    """Per row: held-out MLM accuracy, per-task median/min/max (x100) and the macro score."""
    tasks = list(res["glue"])
    rows = {}
    for name in [TEACHER, *(v.name for v in VARIANTS), TASK_DISTILL]:
        r = {"tasks": {}}
        for t in tasks:
            s = [_pct(x) for x in _seed_scores(res["glue"][t][name])]
            r["tasks"][t] = (statistics.median(s), min(s), max(s))
        r["macro"] = statistics.mean(m for m, _, _ in r["tasks"].values())
        if name in res["pretrain"]:
            r["mlm"] = _pct(res["pretrain"][name]["acc_end"])
        rows[name] = r
    rows[TEACHER]["mlm"] = _pct(res["pretrain"]["full"]["teacher_acc"])
    maj = {}
    for t in tasks:
        c = res["glue"][t][TEACHER]
        maj[t] = _pct(c["majority_baseline"][c["main_metric"]])
    rows["majority"] = {"tasks": {t: (m, m, m) for t, m in maj.items()},
                        "macro": statistics.mean(maj.values())}
    return rows


def _cells_wall(res: dict) -> float:
    return (sum(c["wall_s"] for c in res["pretrain"].values())
            + sum(c["wall_s"] for cells in res["glue"].values() for c in cells.values()))


def render(res: dict, rows: dict, command: str) -> str:
    tasks = list(res["glue"])
    b = res["budget"]
    full, teacher = rows["full"]["macro"], rows[TEACHER]["macro"]
    labels = {v.name: v.label for v in VARIANTS}
    labels.update({TEACHER: "teacher (fine-tuned directly)",
                   TASK_DISTILL: "task-specific distillation, no pretraining",
                   "majority": "majority class"})
    paper = {v.name: v.paper_delta for v in VARIANTS}
    head = ("| model | held-out MLM acc | "
            + " | ".join(f"{get_task(t).dir_name} {get_task(t).main_metric}" for t in tasks)
            + " | macro | Δ vs full | paper Δ (Table 4) | % of teacher |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for name, r in rows.items():
        cells = [f"{m:.1f} ({lo:.1f}–{hi:.1f})" if b["seeds"] > 1 and name != "majority"
                 else f"{m:.1f}" for m, lo, hi in r["tasks"].values()]
        mlm = f"{r['mlm']:.1f}" if "mlm" in r else "–"
        delta = f"{r['macro'] - full:+.2f}" if name not in (TEACHER, "majority") else "–"
        pd = paper.get(name)
        lines.append(f"| {labels[name]} | {mlm} | " + " | ".join(cells)
                     + f" | {r['macro']:.1f} | {delta} | "
                     + (f"{pd:+.2f}" if pd is not None else "–")
                     + f" | {100 * r['macro'] / teacher:.0f} % |")
    pre = res["pretrain"]["full"]
    order_paper = [v.name for v in sorted(VARIANTS[1:], key=lambda v: v.paper_delta)]
    order_here = sorted(order_paper, key=lambda n: rows[n]["macro"])
    return "\n".join([
        "# A miniature DistilBERT study",
        "",
        f"`{command}`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()}-core CPU: the cells "
        f"took {_cells_wall(res) / 60:.0f} min of wall time (each cell's own time, summed).",
        "",
        f"Teacher: the demo's all-MiniLM-L6-v2 with its fitted MLM head ({pre['teacher_acc']:.1%} "
        f"held-out masked-token accuracy). Students: 3-layer DistilBERT, {b['steps']} "
        "pretraining steps of the demo recipe each (BBC news, batch 16, seq 128). GLUE: "
        f"{b['max_train']} training examples per task, {b['epochs']} epoch(s), batch 16, "
        f"lr 1e-4, scored on the {'first ' + str(b['max_eval']) + ' examples of the ' if b['max_eval'] else ''}"
        f"dev set; median of {b['seeds']} fine-tuning seed(s)"
        + (" with the min–max across seeds in brackets" if b["seeds"] > 1 else "")
        + "; one pretraining run per variant. Macro = mean of the tasks' main metrics (x100).",
        "",
        *lines,
        "",
        f"Full recipe: {rows['full']['macro'] / teacher:.0%} of the teacher's macro score "
        f"(paper, DistilBERT vs BERT-base: 97 %). Task-specific distillation with no "
        f"pretraining: {rows[TASK_DISTILL]['macro'] / teacher:.0%}.",
        "",
        f"Ablation order, most harmful first: paper {', '.join(order_paper)}; here "
        f"{', '.join(order_here)}"
        + (" (the same)." if order_here == order_paper else " (not the paper's order)."),
        ""])


def plot(rows: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rows if n != "majority"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    macro = [rows[n]["macro"] for n in names]
    # the spread of the macro score: the mean of the tasks' seed minima and maxima
    lo = [rows[n]["macro"] - statistics.mean(x[1] for x in rows[n]["tasks"].values())
          for n in names]
    hi = [statistics.mean(x[2] for x in rows[n]["tasks"].values()) - rows[n]["macro"]
          for n in names]
    a1.barh(names, macro, xerr=[lo, hi], color="#4c72b0")
    a1.axvline(rows["majority"]["macro"], color="grey", ls="--", label="majority class")
    # the differences are a few points: start the axis near the lowest score, not at 0
    low = min(macro + [rows["majority"]["macro"]]) - sum(lo) / len(lo) - 3
    a1.set_xlim(max(0.0, low), max(m + h for m, h in zip(macro, hi)) + 2)
    a1.set_xlabel("GLUE macro score (dev, median of seeds)")
    a1.invert_yaxis()
    a1.legend(loc="lower right")
    mlm = [n for n in names if "mlm" in rows[n]]
    a2.barh(mlm, [rows[n]["mlm"] for n in mlm], color="#dd8452")
    a2.set_xlabel("held-out masked-token accuracy (%)")
    a2.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line -----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="launch/study.py",
        description="The paper's ablations in miniature from the demo teacher: pretraining "
                    "variants scored on held-out MLM accuracy and GLUE dev sets, beside the "
                    "teacher, task-specific distillation and the majority class.")
    p.add_argument("--out", default="runs/study",
                   help="where cells, study.md and study.png go (default runs/study); a "
                        "second run skips finished cells")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke-size study: {QUICK.steps} steps, {QUICK.seeds} seed, "
                        f"{'+'.join(QUICK.tasks)}, {QUICK.max_train} examples, dev subsets")
    p.add_argument("--steps", type=int, help="pretraining steps per variant")
    p.add_argument("--seeds", type=int, help="GLUE fine-tuning seeds per cell")
    p.add_argument("--tasks", help="comma list of GLUE tasks (default sst2,mrpc,cola,rte)")
    p.add_argument("--max-train", type=int, help="GLUE training examples per task")
    p.add_argument("--epochs", type=int, help="GLUE epochs")
    p.add_argument("--data-dir", default=str(GLUE_DIR) if GLUE_DIR.is_dir() else "",
                   help="a local GLUE folder in the tsv layout (default ../shared/data/glue "
                        "when present, else the hub)")
    p.add_argument("--student-layers", default="0,2,5",
                   help="teacher layers of the task-distilled student (default 0,2,5, as the "
                        "demo student)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="pretraining overrides on configs/demo.yaml for every variant")
    return p.parse_args(argv)


@main_guard
def main() -> int:
    args = parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    b = QUICK if args.quick else DEFAULT
    over = {k: getattr(args, k) for k in ("steps", "seeds", "epochs")
            if getattr(args, k) is not None}
    if args.max_train is not None:
        over["max_train"] = args.max_train
    if args.tasks:
        over["tasks"] = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    b = Budget(**{**b.__dict__, **over})
    for k in ("steps", "seeds", "max_train", "epochs"):
        if getattr(b, k) < 1:
            raise UserError(f"--{k.replace('_', '-')}: {getattr(b, k)}; must be >= 1")
    for o in args.overrides:
        key = o.split("=", 1)[0]
        if key in _STUDY_KEYS:
            raise UserError(f"{key}: set by the study ({_STUDY_KEYS[key]}); drop the override")
    for t in b.tasks:
        get_task(t)  # an unknown task is refused before any run
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run_study(out, b, list(args.overrides), args.data_dir, args.student_layers)
    rows = summarise(res)
    command = " ".join(["python launch/study.py", *sys.argv[1:]])
    (out / "study.md").write_text(render(res, rows, command))
    (out / "study.json").write_text(json.dumps({"rows": rows, **res}, indent=1, default=str))
    plot(rows, out / "study.png")
    _say(f"wrote {out / 'study.md'}, {out / 'study.png'}")
    print((out / "study.md").read_text(), flush=True)
    return 0
