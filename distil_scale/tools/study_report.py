"""The study's tables (study.md) and figure (study.png), from the cells' results.

Every difference is an arm minus the full recipe at the same pretraining seed; its interval is
a 95 % t-interval over seeds. An interval that holds 0 is reported as unresolved, with the
minimal detectable effect, and arms are never put in an order their intervals do not support.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

import numpy as np

from . import study_eval as E
from .study_stats import (bootstrap_se, excludes_zero, minimal_detectable_effect,
                          paired_differences, pct_above_floor, t_interval)

PRIMARY = (("acc", "masked-token accuracy (%)", 100.0), ("ce", "cross-entropy (nats)", 1.0),
           ("kl", "KL(teacher ‖ student) (nats)", 1.0))
LABELS = {"teacher": "teacher (prepared once, fixed)", "step0": "step-0 control (teacher "
          "layers, no distillation step)", "distilbert_d": "DistilBERT(D): full-recipe student "
          "+ task distillation from the fine-tuned teacher"}


def _compare(vals: dict, ref: dict, scale: float) -> dict:
    """Level of ``vals`` and its paired difference to ``ref`` (both {seed: value}), scaled."""
    v = {s: x * scale for s, x in vals.items()}
    r = {s: x * scale for s, x in ref.items()}
    d = paired_differences(v, r)
    ci = t_interval(d)
    return {"values": v, "level": t_interval(list(v.values())), "diffs": d, "diff": ci,
            "resolved": excludes_zero(ci), "mde": minimal_detectable_effect(ci["sd"], ci["n"])}


def _doc_se(res: dict, arm: str, seeds: list, metric: str, scale: float) -> float:
    """Evaluation error of the seed-mean difference: bootstrap over held-out documents."""
    if arm == "step0":
        a = [E.load_sums(res["scores"]["step0"]["sums"])] * len(seeds)
    else:
        a = [E.load_sums(res["scores"][f"{arm}/seed{s}"]["sums"]) for s in seeds]
    f = [E.load_sums(res["scores"][f"full/seed{s}"]["sums"]) for s in seeds]
    key = "correct" if metric == "acc" else metric
    num = np.stack([x[key] - y[key] for x, y in zip(a, f)])
    return scale * bootstrap_se(num, f[0]["n"])


def _probe_se(res: dict, arm: str, seeds: list) -> float:
    def corr(name):
        return np.asarray(res["probes"][name]["correct"], dtype=float)
    a = [corr("step0" if arm == "step0" else f"{arm}/seed{s}") for s in seeds]
    f = [corr(f"full/seed{s}") for s in seeds]
    num = np.stack([x - y for x, y in zip(a, f)])
    return 100.0 * bootstrap_se(num, np.ones(num.shape[1]))


def summarise(res: dict) -> dict:
    arms = [a["name"] for a in res["arms"]]
    seeds = sorted(int(s) for s in res["runs"]["full"])
    sc, pr, ft = res["scores"], res["probes"], res["ft"]
    primary, probe = {}, {}
    for m, _, scale in PRIMARY:
        full = {s: sc[f"full/seed{s}"][m] for s in seeds}
        primary[m] = {a: _compare({s: sc[f"{a}/seed{s}"][m] for s in seeds}, full, scale)
                      for a in arms}
        primary[m]["step0"] = _compare({s: sc["step0"][m] for s in seeds}, full, scale)
        for a in [*arms[1:], "step0"]:
            primary[m][a]["eval_se"] = _doc_se(res, a, seeds, m, scale)
    full_p = {s: pr[f"full/seed{s}"]["acc"] for s in seeds}
    for a in arms:
        probe[a] = _compare({s: pr[f"{a}/seed{s}"]["acc"] for s in seeds}, full_p, 100.0)
    probe["step0"] = _compare({s: pr["step0"]["acc"] for s in seeds}, full_p, 100.0)
    for a in [*arms[1:], "step0"]:
        probe[a]["eval_se"] = _probe_se(res, a, seeds)
    floor = res["heldout"]["floor"]
    t_acc = 100 * sc["teacher"]["acc"]
    maj = 100 * pr["teacher"]["majority"]
    for a, r in primary["acc"].items():
        r["pct_teacher"] = pct_above_floor(r["level"]["mean"], 100 * floor["acc"], t_acc)
    for a, r in probe.items():
        r["pct_teacher"] = pct_above_floor(r["level"]["mean"], maj, 100 * pr["teacher"]["acc"])

    def ft_mean(name):
        return 100 * float(np.mean(ft[name]["acc"]))
    ft_full = {s: ft_mean(f"full/seed{s}") / 100 for s in seeds}
    fine = {"teacher": ft_mean("teacher"), "step0": ft_mean("step0"),
            "majority": 100 * ft["teacher"]["majority"],
            "full": _compare(ft_full, ft_full, 100.0),
            "distilbert_d": _compare({s: ft_mean(f"distilbert_d/seed{s}") / 100 for s in seeds},
                                     ft_full, 100.0)}
    return {"arms": arms, "seeds": seeds, "primary": primary, "probe": probe, "ft": fine,
            "teacher": {"acc": t_acc, "ce": sc["teacher"]["ce"],
                        "probe": 100 * pr["teacher"]["acc"]},
            "floor": {"acc": 100 * floor["acc"], "ce": floor["ce"], "probe": maj},
            "curves": curves(res, arms, seeds)}


def curves(res: dict, arms: list, seeds: list) -> dict:
    """{arm: {step: [accuracy per seed] (x100)}} from each run's own evaluations."""
    out = {}
    for a in arms:
        by_step: dict = {}
        for s in seeds:
            for step, _loss, acc in res["runs"][a][s]["curve"]:
                by_step.setdefault(int(step), []).append(100 * acc)
        out[a] = dict(sorted(by_step.items()))
    return out


# -- markdown ---------------------------------------------------------------------------------
def _f(x: float, nd: int = 2) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:.{nd}f}"


def _pct(x: float) -> str:
    return f"{x:.0f} %" if math.isfinite(x) else "– (teacher not above the floor)"


def _ci(r: dict, nd: int = 2) -> str:
    c = r["diff"]
    return f"{c['mean']:+.{nd}f} [{_f(c['lo'], nd)}, {_f(c['hi'], nd)}]"


def _verdict(r: dict, nd: int = 2) -> str:
    if not r["resolved"]:
        return f"not resolved (MDE {_f(r['mde'], nd)})"
    return "higher than full" if r["diff"]["mean"] > 0 else "lower than full"


def _primary_table(s: dict, labels: dict) -> list[str]:
    head = ("| model | acc % (mean ± t) | Δ acc vs full [95 % CI] | eval SE | verdict | "
            "Δ CE [95 % CI] | verdict | Δ KL [95 % CI] | % of teacher above floor |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    p = s["primary"]
    t, fl = s["teacher"], s["floor"]
    lines.append(f"| {LABELS['teacher']} | {t['acc']:.2f} | – | – | – | – | – | – | 100 % |")
    for a in [*s["arms"], "step0"]:
        acc, ce, kl = p["acc"][a], p["ce"][a], p["kl"][a]
        lvl = acc["level"]
        level = (f"{lvl['mean']:.2f} ± {_f(lvl['half'])}" if a != "step0"
                 else f"{lvl['mean']:.2f}")
        if a == "full":
            lines.append(f"| {labels[a]} | {level} | 0 (reference) | – | – | 0 | – | 0 | "
                         f"{_pct(acc['pct_teacher'])} |")
            continue
        lines.append(f"| {labels.get(a, LABELS.get(a, a))} | {level} | {_ci(acc)} | "
                     f"{_f(acc['eval_se'])} | {_verdict(acc)} | {_ci(ce, 3)} | "
                     f"{_verdict(ce, 3)} | {_ci(kl, 3)} | {_pct(acc['pct_teacher'])} |")
    lines.append(f"| floor: most frequent training token (CE: unigram) | {fl['acc']:.2f} | – | "
                 f"– | – | – | – | – | 0 % |")
    return lines


def _probe_table(s: dict, labels: dict) -> list[str]:
    head = ("| model | SST-2 probe acc % | Δ vs full [95 % CI] | eval SE | verdict | "
            "% of teacher above majority |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    lines.append(f"| {LABELS['teacher']} | {s['teacher']['probe']:.2f} | – | – | – | 100 % |")
    for a in [*s["arms"], "step0"]:
        r = s["probe"][a]
        lvl = r["level"]
        level = f"{lvl['mean']:.2f} ± {_f(lvl['half'])}" if a != "step0" else f"{lvl['mean']:.2f}"
        if a == "full":
            lines.append(f"| {labels[a]} | {level} | 0 (reference) | – | – | "
                         f"{_pct(r['pct_teacher'])} |")
            continue
        lines.append(f"| {labels.get(a, LABELS.get(a, a))} | {level} | {_ci(r)} | "
                     f"{_f(r['eval_se'])} | {_verdict(r)} | {_pct(r['pct_teacher'])} |")
    lines.append(f"| majority class | {s['floor']['probe']:.2f} | – | – | – | 0 % |")
    return lines


def _ft_lines(s: dict) -> list[str]:
    f = s["ft"]
    d, full = f["distilbert_d"], f["full"]
    return [
        "| model | SST-2 dev acc %, 1 epoch |", "| --- | --- |",
        f"| teacher, fine-tuned | {f['teacher']:.2f} |",
        f"| full-recipe students, fine-tuned (mean ± t over seeds) | "
        f"{full['level']['mean']:.2f} ± {_f(full['level']['half'])} |",
        f"| {LABELS['distilbert_d']} | {d['level']['mean']:.2f} ± {_f(d['level']['half'])} "
        f"(Δ vs fine-tuned full {_ci(d)}, {_verdict(d)}) |",
        f"| step-0 control, fine-tuned | {f['step0']:.2f} |",
        f"| majority class | {f['majority']:.2f} |"]


def _curve_lines(s: dict, labels: dict) -> list[str]:
    arms = s["arms"]
    head = "| step | " + " | ".join(arms) + " |"
    lines = [head, "|" + " --- |" * (len(arms) + 1)]
    full = s["curves"]["full"]
    for step, vals in full.items():
        cells = [f"{np.mean(vals):.2f}"]
        for a in arms[1:]:
            v = s["curves"][a].get(step)
            if not v:
                cells.append("–")
                continue
            ci = t_interval([x - y for x, y in zip(v, vals)])
            cells.append(f"{np.mean(v):.2f} (Δ {ci['mean']:+.2f} ± {_f(ci['half'])})")
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


def _model_name(path: str) -> str:
    """A model installed as a package by its ``pypi:`` name: the install path is this
    machine's, not the model's."""
    parts = Path(path).parts
    if "site-packages" in parts and parts.index("site-packages") + 1 < len(parts):
        return "pypi:" + parts[parts.index("site-packages") + 1]
    return path


def render(res: dict, s: dict, command: str) -> str:
    b = res["budget"]
    labels = {a["name"]: a["label"] for a in res["arms"]}
    held, t = res["heldout"], res["teacher"]
    n_pos = res["scores"]["teacher"]["positions"]
    wall = sum(float(r["wall_s"]) for runs in res["runs"].values() for r in runs.values())
    resolved = [a for a in s["arms"][1:] if s["primary"]["acc"][a]["resolved"]]
    return "\n".join([
        "# A miniature DistilBERT ablation study", "",
        f"`{command}`, {time.strftime('%Y-%m-%d')}, {os.cpu_count()}-core CPU; this "
        f"invocation took {res['wall_s'] / 60:.0f} min ({len(res['ran'])} cells run, "
        f"{len(res['reused'])} reused; the pretraining runs took {wall / 60:.0f} min when "
        "they ran).", "",
        f"Teacher: {_model_name(t['source'])}"
        + (f", MLM head prepared once for {t['steps']} steps (seed fixed, not a student's)"
           if t["prepared"] else "") + ". "
        f"Students: {b['steps']} pretraining steps each, {b['seeds']} pretraining seeds per "
        "arm (0 .. n-1), paired: at one seed every arm reads the same batches with the same "
        "masks. Unit of the statistics: the pretraining seed. Δ = arm − full recipe at the "
        "same seed; mean with a 95 % t-interval over seeds; eval SE = bootstrap standard error "
        "of that mean from the evaluation set alone (documents, or dev examples); an interval "
        "holding 0 is *not resolved*, with the minimal detectable effect (80 % power).", "",
        f"## Primary endpoint: held-out masked LM ({held['docs']} documents, {held['tokens']:,} "
        f"tokens, {b['draws']} fixed mask draw(s): {n_pos:,} scored positions, the same for "
        "every model)", "",
        *_primary_table(s, labels), "",
        "% of teacher above floor = (model − floor) / (teacher − floor) on accuracy. "
        + ("Intervals that exclude 0 on accuracy: " + ", ".join(resolved) + "."
           if resolved else "No arm's accuracy difference excludes 0."), "",
        "## Learning curves (each run's own held-out evaluation, accuracy %; mean over seeds, "
        "Δ to full ± t half-width)", "",
        *_curve_lines(s, labels), "",
        "## Secondary endpoint: SST-2 dev ("
        + (f"first {b['max_eval']}" if b["max_eval"] else "all") + " examples)", "",
        f"Linear probe: logistic regression (C = {E.PROBE_C:g}, standardised features) on "
        f"mean-pooled frozen features of {b['probe_train']:,} fixed training sentences, scored "
        "once on dev.", "",
        *_probe_table(s, labels), "",
        f"Fine-tuning: {b['ft_train']:,} training examples, one epoch (the only epoch is the "
        f"reported one: no selection on dev), batch 16, lr 1e-4, {b['ft_seeds']} fine-tuning "
        "seed(s) averaged within each pretraining seed.", "",
        *_ft_lines(s), "",
        "Arms are not ranked against each other: only differences whose intervals exclude 0 "
        "are read as effects, and the paper's deltas (GLUE macro, Table 4: −L_ce −2.96, "
        "−L_cos −1.46, random init −3.69) are on another endpoint and scale.", ""])


# -- figure -----------------------------------------------------------------------------------
def plot(res: dict, s: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, a in enumerate(s["arms"]):
        c = colors[i % len(colors)]
        steps = list(s["curves"][a])
        per_seed = np.array([s["curves"][a][k] for k in steps], dtype=float)
        for j in range(per_seed.shape[1] if per_seed.ndim == 2 else 0):
            a1.plot(steps, per_seed[:, j], color=c, alpha=0.25, lw=0.8)
        a1.plot(steps, per_seed.mean(axis=1), color=c, lw=2, label=a)
    a1.axhline(s["teacher"]["acc"], color="k", ls=":", label="teacher (whole held-out set)")
    a1.set_xlabel("pretraining step")
    a1.set_ylabel("held-out masked-token accuracy (%)")
    a1.legend(fontsize=8)
    for ax, table, title in ((a2, s["primary"]["acc"], "Δ held-out accuracy vs full (points)"),
                             (a3, s["probe"], "Δ SST-2 probe accuracy vs full (points)")):
        names = [a for a in [*s["arms"][1:], "step0"]]
        for y, a in enumerate(names):
            r = table[a]
            ax.scatter(r["diffs"], [y] * len(r["diffs"]), color="grey", s=14, zorder=3)
            c = r["diff"]
            if math.isfinite(c["half"]):
                ax.errorbar(c["mean"], y, xerr=c["half"], fmt="o", color="C3", capsize=4)
        ax.axvline(0, color="k", lw=0.8)
        ax.set_yticks(range(len(names)), names)
        ax.invert_yaxis()
        ax.set_xlabel(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
