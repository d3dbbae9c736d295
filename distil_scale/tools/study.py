"""A miniature of the paper's ablations (Sanh et al. 2019, Table 4) that can tell its arms
apart, on real data, on a CPU: ``python launch/study.py``.

Design (fixed before any run):

* one teacher: the demo's all-MiniLM-L6-v2 with its MLM head fitted for ``teacher_steps``
  (four times the demo's 150) with a fixed seed, prepared once and shared by every student;
* arms: the full triple loss with teacher initialisation, - L_ce, - L_cos and random init
  (``--with-no-mlm`` adds - L_mlm, whose paper effect, -0.31, is below any miniature's
  resolution), each pretrained for ``steps`` from ``seeds`` pretraining seeds. The design is
  paired: run.seed fixes the data order and the masks, so arm and full recipe at one seed saw
  the same batches; it also draws dropout and the random-init weights;
* learning curves: each run's own held-out evaluation every ``eval_every`` steps
  (metrics.jsonl; the first ``data.eval_sequences`` held-out sequences in that seed's order);
* primary endpoint: masked-LM cross-entropy, accuracy and KL(teacher || student) over every
  held-out document with fixed mask draws (the same positions for every model), beside the
  floor of always guessing the most frequent token (study_eval.py);
* secondary endpoint: an SST-2 linear probe on frozen mean-pooled features (fixed training
  subset, fixed C, one score on dev: no selection), and one-epoch SST-2 fine-tuning of the
  teacher, the full-recipe students, DistilBERT(D) (task distillation from the fine-tuned
  teacher on top of each full-recipe student) and the step-0 control (the teacher-initialised
  student with no distillation step). One epoch means the reported dev score is the only
  epoch's: nothing is selected on dev;
* statistics (study_stats.py): the unit is the pretraining seed; per arm the paired
  difference to the full recipe, its mean with a 95 % t-interval, the bootstrap evaluation
  error over held-out documents (dev examples for SST-2), and for an interval that holds 0
  the minimal detectable effect.

Budget (default), measured on 2 idle CPU cores (2026-12-06, docs/study.md): teacher
preparation (600 steps) 9 min, 4 arms x 4 seeds x 150 steps with their start-up and curve
evaluations 68 min, held-out scoring of the teacher and 17 students, probes and 10 one-epoch
fine-tunings on 4,000 SST-2 sentences 23 min: 101 min, about the 100 min target. docs/study.md
gives the time of the run it reports. ``--quick`` (2 seeds,
12 steps, 40 teacher steps, small SST-2 subsets): about 8 min, and writes to runs/study-quick.

Every cell keeps a key of its resolved config, budget, upstream cells and the code version
(study_cells.py): a changed setting reruns the cells it reaches and reuses the rest.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import runtime
from ..assets import CONFIGS
from ..config import load_config, to_dict
from ..data.eval_cache import build_eval_set, scan_token_counts
from ..data.sources import source_fingerprint
from ..engine import engine_class
from ..errors import UserError, main_guard
from ..glue.config import load_glue_config
from ..glue.distill import distill_task
from ..glue.runner import finetune
from ..glue.tasks import get_task
from ..hub import load_tokenizer, resolve_model_path
from ..families import load_mlm
from ..models import build_student
from ..train import train
from ..train.state import seed_all
from ..train.teacher import load_teacher
from . import study_eval as E
from .study_cells import Cells, code_version, files_fingerprint
from .study_report import plot, render, summarise

REPO = Path(__file__).resolve().parents[2]
DEMO = CONFIGS / "demo.yaml"
GLUE_DIR = REPO.parent / "shared" / "data" / "glue"
# the tables and figure are redrawn from the cells on every run: editing them reruns no cell
REPORT_CODE = ("tools/study_report.py",)
# tools no cell imports (tested): a change to the bench or the GPU check is not a new experiment
NOT_RUN = ("tools/bench/", "tools/gpu_check/", "tools/plan.py", "tools/memory.py",
           "tools/bundle.py")
TEACHER_SEED = 1000  # the teacher's preparation stream and masks: no student's run.seed


@dataclass(frozen=True)
class Arm:
    name: str
    label: str
    overrides: tuple = ()
    paper_delta: float | None = None  # Table 4: GLUE macro-score change from the full recipe


FULL = Arm("full", "full recipe (L_ce + L_mlm + L_cos, teacher init)", (), 0.0)
ARMS = (FULL,
        Arm("no_ce", "- L_ce (no soft-target KL)", ("loss.alpha_ce=0",), -2.96),
        Arm("no_cos", "- L_cos", ("loss.alpha_cos=0",), -1.46),
        Arm("random_init", "random init (same triple loss)", ("student.init=random",), -3.69))
NO_MLM = Arm("no_mlm", "- L_mlm", ("loss.alpha_mlm=0",), -0.31)


@dataclass(frozen=True)
class Budget:
    seeds: int            # pretraining seeds per arm (the statistical unit)
    steps: int            # pretraining steps per run
    eval_every: int       # learning-curve interval
    teacher_steps: int    # teacher MLM-head preparation steps (once)
    draws: int            # fixed mask draws over the held-out documents
    probe_train: int      # SST-2 training sentences for the probe
    ft_train: int         # SST-2 training examples for the fine-tuning cells
    max_eval: int = 0     # SST-2 dev examples (0: all 872, the reported numbers)
    heldout_docs: int = 0  # held-out documents scored (0: all)
    ft_seeds: int = 1     # fine-tuning seeds per cell, averaged within a pretraining seed


DEFAULT = Budget(seeds=4, steps=150, eval_every=25, teacher_steps=600, draws=3,
                 probe_train=4000, ft_train=4000)
QUICK = Budget(seeds=2, steps=12, eval_every=4, teacher_steps=40, draws=1, probe_train=500,
               ft_train=200, max_eval=200)

# pretraining keys the study sets itself, and the flag that sets them
_STUDY_KEYS = {"run.output_dir": "--out", "run.seed": "--seeds (0 .. N-1)",
               "train.max_steps": "--steps", "train.eval_every": "--eval-every",
               "checkpoint.every_steps": "halfway and at the end",
               "teacher.prepare_steps": "--teacher-steps",
               "teacher.prepared_dir": "the teacher cell"}
# settings that name where a cell writes, not what it computes
_PLACES = ("run.output_dir", "metrics.progress_bar", "teacher.prepared_dir")


def _say(msg: str) -> None:
    print(f"study: {msg}", flush=True)


def _inputs(cfg, **more) -> dict:
    """What a teacher preparation or the held-out set depends on: the teacher, data and
    masking settings and the corpus itself (not the students' settings)."""
    t = to_dict(cfg.teacher)
    t.pop("prepared_dir", None)
    return {"teacher": t, "data": to_dict(cfg.data), "masking": to_dict(cfg.masking),
            "corpus": source_fingerprint(cfg.data.source), **more}


def _spec(cfg, **more) -> dict:
    c = to_dict(cfg)
    for key in _PLACES:
        sect, name = key.split(".")
        c.get(sect, {}).pop(name, None)
    return {"config": c, **more}


@dataclass
class Study:
    out: Path
    b: Budget
    overrides: list
    data_dir: str
    arms: tuple
    cells: Cells

    def pretrain_cfg(self, d: Path, extra: list):
        return load_config(str(DEMO), [f"run.output_dir={d}", "metrics.progress_bar=false",
                                       *self.overrides, *extra])

    # -- the teacher and the held-out set -----------------------------------------------------
    def teacher(self) -> dict:
        name = "teacher"
        d = self.cells.dir(name)
        cfg = self.pretrain_cfg(d, [f"run.seed={TEACHER_SEED}",
                                    f"teacher.prepare_steps={self.b.teacher_steps}",
                                    f"teacher.prepared_dir={d / 'prepared'}"])
        spec = _inputs(cfg, seed=TEACHER_SEED, precision=cfg.train.precision,
                       attn=cfg.train.attn_implementation, backend=cfg.parallel.backend)

        def run(d: Path) -> dict:
            _say(f"teacher: preparing {cfg.teacher.name_or_path} once ({self.b.teacher_steps} "
                 f"steps, seed {TEACHER_SEED})")
            rt = runtime.resolve(engine=engine_class(cfg.parallel.backend),
                                 precision=cfg.train.precision,
                                 attn=cfg.train.attn_implementation,
                                 teacher_dtype=cfg.teacher.dtype)
            path = resolve_model_path(cfg.teacher.name_or_path)
            tok = load_tokenizer(path)
            cache = d / "cache"
            eval_ids = build_eval_set(cfg.data, tok, cfg.data.eval_sequences,
                                      seed=TEACHER_SEED, cache_dir=cache)
            counts = functools.cache(lambda: scan_token_counts(
                cfg.data, tok, cfg.masking.count_docs, seed=TEACHER_SEED, cache_dir=cache))
            _, info = load_teacher(cfg, tok, rt, eval_ids, counts)
            return {"path": info.get("prepared_dir") or path, "prepared": info["prepared"],
                    "steps": info.get("steps", 0), "source": path}
        return self.cells.run(name, spec, run)

    def heldout(self, teacher: dict) -> dict:
        cfg = self.pretrain_cfg(self.cells.dir("heldout"), [])
        spec = _inputs(cfg, draws=self.b.draws, heldout_docs=self.b.heldout_docs)

        def run(d: Path) -> dict:
            tok = load_tokenizer(teacher["path"])
            docs = E.heldout_documents(cfg.data, tok, self.b.heldout_docs)
            if len(docs) < 2:
                raise UserError(f"data.heldout_fraction: {len(docs)} held-out document(s) in "
                                f"'{cfg.data.source}'; the study needs several: raise it")
            (d / "docs.json").write_text(json.dumps(docs))
            counts = scan_token_counts(cfg.data, tok, cfg.masking.count_docs,
                                       seed=TEACHER_SEED, cache_dir=d / "cache")
            sums = E.floor_scores(docs, tok, cfg, self.b.draws, counts)
            E.save_sums(d / "floor.npz", sums)
            return {"docs": len(docs), "tokens": sum(map(len, docs)),
                    "floor": {**E.totals(sums), "sums": str(d / "floor.npz")}}
        return self.cells.run("heldout", spec, run, upstream=(teacher,))

    # -- students -----------------------------------------------------------------------------
    def student_cfg(self, d: Path, teacher: dict, arm: Arm, seed: int):
        b = self.b
        return self.pretrain_cfg(d, [
            f"run.seed={seed}", f"train.max_steps={b.steps}", f"train.eval_every={b.eval_every}",
            f"checkpoint.every_steps={max(1, b.steps // 2)}",
            f"teacher.name_or_path={teacher['path']}", *arm.overrides])

    def pretrain(self, teacher: dict, arm: Arm, seed: int) -> dict:
        name = f"pretrain/{arm.name}/seed{seed}"
        d = self.cells.dir(name)
        cfg = self.student_cfg(d, teacher, arm, seed)
        spec = _spec(cfg, data=source_fingerprint(cfg.data.source))
        spec["config"]["teacher"]["name_or_path"] = "the teacher cell"

        def run(d: Path) -> dict:
            _say(f"pretraining '{arm.name}' seed {seed}: {self.b.steps} steps -> {d}")
            s = train(cfg, resume=True)  # continues a cell that was interrupted
            shutil.rmtree(d / "checkpoints", ignore_errors=True)  # the export is what is read
            return {"arm": arm.name, "seed": seed, "student": str(d / "student"),
                    "steps": s["steps"], "wall_s": round(s["wall_s"], 1),
                    "curve": read_curve(d / "metrics.jsonl")}
        return self.cells.run(name, spec, run, upstream=(teacher,))

    def step0(self, teacher: dict) -> dict:
        """The teacher-initialised student with no distillation step (the step-0 control)."""
        d = self.cells.dir("step0")
        cfg = self.student_cfg(d, teacher, FULL, 0)
        spec = {"student": to_dict(cfg.student), "attn": cfg.train.attn_implementation}

        def run(d: Path) -> dict:
            mlm, _ = load_mlm(teacher["path"])
            seed_all(0)
            student, layers = build_student(mlm, cfg.student, "eager")
            student.save_pretrained(d / "student")
            load_tokenizer(teacher["path"]).save_pretrained(d / "student")
            return {"student": str(d / "student"), "layers": list(layers)}
        return self.cells.run("step0", spec, run, upstream=(teacher,))

    # -- endpoints ----------------------------------------------------------------------------
    def score(self, name: str, model: dict, teacher: dict, held: dict,
              t_score: dict | None = None) -> dict:
        """The primary endpoint of one model; the teacher's own cell (``t_score`` None) keeps
        its hidden rows for every student's KL."""
        cfg = self.pretrain_cfg(self.cells.dir("heldout"), [])
        spec = {"draws": self.b.draws, "seq": cfg.data.max_seq_len,
                "masking": to_dict(cfg.masking), "precision": "auto (bf16 where native)"}

        def run(d: Path) -> dict:
            docs = json.loads((self.cells.dir("heldout") / "docs.json").read_text())
            tok = load_tokenizer(teacher["path"])
            if t_score is None:
                sums, rows = E.score_teacher(teacher["path"], docs, tok, cfg, self.b.draws)
                torch.save(rows, d / "teacher_rows.pt")
            else:
                rows = torch.load(t_score["rows"])
                sums = E.score_model(model["student"], teacher["path"], rows, docs, tok, cfg,
                                     self.b.draws)
            E.save_sums(d / "sums.npz", sums)
            return {**E.totals(sums), "sums": str(d / "sums.npz"),
                    **({"rows": str(d / "teacher_rows.pt")} if t_score is None else {})}
        ups = (model, held) if t_score is None else (model, t_score, held)
        return self.cells.run(f"score/{name}", spec, run, upstream=ups)

    def probe(self, name: str, model: dict, data_fp: list) -> dict:
        spec = {"probe_train": self.b.probe_train, "max_eval": self.b.max_eval, "C": E.PROBE_C,
                "max_len": E.PROBE_MAX_LEN, "data": data_fp}

        def run(d: Path) -> dict:
            data = E.probe_data(self.data_dir, self.b.probe_train, self.b.max_eval)
            r = E.probe(model.get("student") or model["path"], data)
            return {**r, "majority": E.majority_acc(data)}
        return self.cells.run(f"probe/{name}", spec, run, upstream=(model,))

    def glue_cfg(self, d: Path, save_model: bool, extra: tuple = ()):
        b = self.b
        return load_glue_config("sst2", overrides=[
            f"run.output_dir={d / 'run'}", f"run.seeds={b.ft_seeds}",
            f"run.save_model={save_model}", f"data.data_dir={self.data_dir}",
            f"data.max_train_samples={b.ft_train}", f"data.max_eval_samples={b.max_eval}",
            "train.epochs=1", "train.batch_size=16", "train.lr=1e-4",
            "train.progress_bar=false", "train.tensorboard=false", *extra])

    def finetune(self, name: str, model: dict, data_fp: list, save_model: bool = False,
                 teacher_ft: dict | None = None) -> dict:
        d = self.cells.dir(f"sst2/{name}")
        cfg = self.glue_cfg(d, save_model)
        spec = _spec(cfg, data=data_fp, distill=teacher_ft is not None)
        task = get_task("sst2")

        def run(d: Path) -> dict:
            spec_model = model.get("student") or model["path"]
            if teacher_ft is None:
                _say(f"sst2: fine-tuning {name}")
                res = finetune(task, spec_model, cfg)
            else:
                _say(f"sst2: task distillation {name} from the fine-tuned teacher")
                res = distill_task(task, teacher_ft["model"], spec_model, cfg)
            runs = res.get("seeds") or [res]
            out = {"acc": [r["metrics"][res["main_metric"]] for r in runs],
                   "majority": res["majority_baseline"][res["main_metric"]]}
            if save_model:
                out["model"] = str(teacher_model_dir(d / "run"))
            return out
        ups = (model,) if teacher_ft is None else (model, teacher_ft)
        return self.cells.run(f"sst2/{name}", spec, run, upstream=ups)


def read_curve(path: Path) -> list:
    """[(step, held-out loss, held-out accuracy)] from a run's evaluations."""
    out = []
    for ln in path.read_text().splitlines():
        row = json.loads(ln) if ln.strip() else {}
        if "eval/student_mlm_acc" in row:
            out.append([row["step"], row["eval/student_mlm_loss"], row["eval/student_mlm_acc"]])
    return out


def teacher_model_dir(run_dir: Path) -> Path:
    """The fine-tuned teacher a task distillation learns from (its first seed)."""
    for d in (run_dir / "model", *sorted(run_dir.glob("seed_*/model"))):
        if (d / "config.json").is_file():
            return d
    raise UserError(f"--out: the fine-tuned teacher in '{run_dir}' has no saved model; delete "
                    f"'{run_dir.parent}' and run the study again")


def run_study(st: Study) -> dict:
    t0 = time.time()
    teacher = st.teacher()
    held = st.heldout(teacher)
    step0 = st.step0(teacher)
    runs = {a.name: {s: st.pretrain(teacher, a, s) for s in range(st.b.seeds)} for a in st.arms}
    t_score = st.score("teacher", teacher, teacher, held)
    scores = {"teacher": t_score, "step0": st.score("step0", step0, teacher, held, t_score)}
    for a, by_seed in runs.items():
        for s, r in by_seed.items():
            scores[f"{a}/seed{s}"] = st.score(f"{a}/seed{s}", r, teacher, held, t_score)
    fp = files_fingerprint(sorted((Path(st.data_dir) / "SST-2").glob("*.tsv"))) \
        if st.data_dir else ["hub"]
    probes = {"teacher": st.probe("teacher", teacher, fp), "step0": st.probe("step0", step0, fp)}
    for a, by_seed in runs.items():
        for s, r in by_seed.items():
            probes[f"{a}/seed{s}"] = st.probe(f"{a}/seed{s}", r, fp)
    t_ft = st.finetune("teacher", teacher, fp, save_model=True)
    ft = {"teacher": t_ft, "step0": st.finetune("step0", step0, fp)}
    for s, r in runs["full"].items():
        ft[f"full/seed{s}"] = st.finetune(f"full/seed{s}", r, fp)
        ft[f"distilbert_d/seed{s}"] = st.finetune(f"distilbert_d/seed{s}", r, fp,
                                                  teacher_ft=t_ft)
    return {"teacher": teacher, "heldout": held, "runs": runs, "scores": scores,
            "probes": probes, "ft": ft, "budget": dataclasses.asdict(st.b),
            "arms": [dataclasses.asdict(a) for a in st.arms], "wall_s": time.time() - t0,
            "ran": list(st.cells.ran), "reused": list(st.cells.reused)}


# -- command line -----------------------------------------------------------------------------
def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="launch/study.py",
        description="The paper's ablations in miniature: full recipe, -L_ce, -L_cos and random "
                    "init from several paired pretraining seeds, scored on the whole held-out "
                    "set and an SST-2 probe, with paired differences and 95 %% intervals, "
                    "beside the teacher, the step-0 control and DistilBERT(D).")
    p.add_argument("--out", help="where cells, study.md and study.png go (default runs/study; "
                                 "--quick: runs/study-quick); a second run reuses the cells "
                                 "whose settings and code are unchanged")
    p.add_argument("--quick", action="store_true",
                   help=f"a smoke-size study: {QUICK.seeds} seeds, {QUICK.steps} steps, "
                        f"{QUICK.teacher_steps} teacher steps, small SST-2 subsets")
    for flag, what in (("seeds", "pretraining seeds per arm"), ("steps", "pretraining steps"),
                       ("eval-every", "learning-curve interval (steps)"),
                       ("teacher-steps", "teacher preparation steps"),
                       ("draws", "fixed mask draws over the held-out documents"),
                       ("probe-train", "SST-2 sentences the probe trains on"),
                       ("ft-train", "SST-2 examples the fine-tuning cells train on"),
                       ("max-eval", "SST-2 dev examples (0: all)"),
                       ("ft-seeds", "fine-tuning seeds per cell")):
        p.add_argument(f"--{flag}", type=int, help=what)
    p.add_argument("--with-no-mlm", action="store_true", help="add the - L_mlm arm")
    p.add_argument("--data-dir", default=str(GLUE_DIR) if GLUE_DIR.is_dir() else "",
                   help="a local GLUE folder in the tsv layout (default ../shared/data/glue "
                        "when present, else the hub)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="pretraining overrides on configs/demo.yaml for the teacher and every "
                        "arm")
    return p.parse_args(argv)


def budget_from(args) -> Budget:
    b = QUICK if args.quick else DEFAULT
    over = {f.name: getattr(args, f.name) for f in dataclasses.fields(Budget)
            if getattr(args, f.name, None) is not None}
    b = dataclasses.replace(b, **over)
    for k in ("seeds", "steps", "eval_every", "teacher_steps", "draws", "probe_train",
              "ft_train", "ft_seeds"):
        if getattr(b, k) < 1:
            raise UserError(f"--{k.replace('_', '-')}: {getattr(b, k)}; must be >= 1")
    if b.seeds < 2:
        raise UserError(f"--seeds: {b.seeds}; an interval needs at least 2 pretraining seeds")
    return b


@main_guard
def main() -> int:
    return run_cli()


def run_cli(argv=None) -> int:
    """The study from ``argv`` (sys.argv when None); returns the exit code."""
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    b = budget_from(args)
    for o in args.overrides:
        key = o.split("=", 1)[0]
        if key in _STUDY_KEYS:
            raise UserError(f"{key}: set by the study ({_STUDY_KEYS[key]}); drop the override")
    # the SST-2 cells come after an hour of pretraining: data they cannot read is refused first
    E.probe_data(args.data_dir, 1, 1)
    out = Path(args.out or ("runs/study-quick" if args.quick else "runs/study"))
    out.mkdir(parents=True, exist_ok=True)
    arms = ARMS + ((NO_MLM,) if args.with_no_mlm else ())
    st = Study(out, b, list(args.overrides), args.data_dir, arms,
               Cells(out / "cells", code_version(exclude=REPORT_CODE + NOT_RUN), say=_say))
    res = run_study(st)
    summary = summarise(res)
    command = " ".join(["python launch/study.py", *(sys.argv[1:] if argv is None else argv)])
    (out / "study.md").write_text(render(res, summary, command))
    (out / "study.json").write_text(json.dumps({"summary": summary, **res}, indent=1,
                                               default=str))
    plot(res, summary, out / "study.png")
    _say(f"ran {len(res['ran'])} cell(s), reused {len(res['reused'])}; wrote "
         f"{out / 'study.md'}, {out / 'study.png'}")
    print((out / "study.md").read_text(), flush=True)
    return 0
