"""GLUE examples from a local GLUE directory (original tsv layout) or the hub (``nyu-mll/glue``),
and the two protocols' splits.

* ``dev``: train on train, select and report on the official dev set (the paper's protocol).
* ``carved``: train + dev pooled, shuffled with a fixed seed and cut 80/10/10 into train / val /
  test; select on val, report on test (the reimplementation report's protocol).

No torch here: a bad file is refused before any model is loaded.
"""
from __future__ import annotations

import csv
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ..errors import UserError, first_line
from .tasks import Task, layout_for

Label = Union[int, float]


@dataclass(frozen=True)
class Example:
    text_a: str
    text_b: Optional[str]
    label: Label


# ----------------------------------------------------------------------------------------------
# local tsv


def _parse_label(task: Task, raw: str, where: str) -> Label:
    raw = raw.strip()
    if task.is_regression:
        try:
            value = float(raw)
        except ValueError:
            raise UserError(f"{where}: label {raw!r} is not a number (task {task.name} "
                            f"is regression)") from None
        if value != value:  # NaN
            raise UserError(f"{where}: label {raw!r} is not a number")
        return value
    if task.tsv_label_names:
        if raw in task.labels:
            return task.labels.index(raw)
    elif raw.isdigit() and int(raw) < len(task.labels):
        return int(raw)
    valid = task.labels if task.tsv_label_names else tuple(str(i) for i in range(len(task.labels)))
    raise UserError(f"{where}: label {raw!r} is not one of task {task.name}'s labels "
                    f"({', '.join(valid)})")


def read_tsv(task: Task, path: Union[str, Path], split_file: str = "train") -> list[Example]:
    """Read one labelled GLUE tsv: quoting off (sentences hold ``"``), BOM stripped, header
    skipped where the task has one, every row's width checked."""
    path = Path(path)
    layout = layout_for(task, split_file)
    if not path.is_file():
        raise UserError(f"--data-dir: missing file '{path}' (expected the original GLUE layout "
                        f"<data-dir>/{task.dir_name}/{split_file}.tsv)")
    csv.field_size_limit(sys.maxsize)
    out = []
    # utf-8-sig strips the BOM that MRPC's header starts with
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        for lineno, row in enumerate(reader, start=1):
            if lineno == 1 and task.header:
                continue
            if not row or (len(row) == 1 and not row[0].strip()):
                continue  # a blank line (a trailing newline)
            where = f"{path}:{lineno}"
            if len(row) != layout.n_cols:
                raise UserError(f"{where}: expected {layout.n_cols} tab-separated columns for "
                                f"{task.name} {split_file}, found {len(row)}")
            b = row[layout.text_b] if layout.text_b is not None else None
            out.append(Example(row[layout.text_a], b,
                               _parse_label(task, row[layout.label], where)))
    if not out:
        raise UserError(f"{path}: no examples")
    return out


def read_local(task: Task, data_dir: Union[str, Path]) -> dict[str, list[Example]]:
    root = Path(data_dir)
    if not root.is_dir():
        raise UserError(f"--data-dir: '{data_dir}' is not a directory")
    tdir = root / task.dir_name
    if not tdir.is_dir():
        raise UserError(f"--data-dir: no '{task.dir_name}' folder in '{data_dir}' "
                        f"(expected <data-dir>/{task.dir_name}/train.tsv)")
    splits = {"train": read_tsv(task, tdir / "train.tsv", "train")}
    for stem, name in task.dev_files:
        splits[name] = read_tsv(task, tdir / f"{stem}.tsv", stem)
    return splits


# ----------------------------------------------------------------------------------------------
# hub


def read_hub(task: Task, dataset_id: str = "nyu-mll/glue") -> dict[str, list[Example]]:
    try:
        import datasets

        ds = datasets.load_dataset(dataset_id, task.name)
    except Exception as e:  # offline, no cache, no such dataset: all one line for the user
        raise UserError(f"could not load '{dataset_id}' config '{task.name}' from the hub "
                        f"({first_line(e, typed=True)}); pass --data-dir DIR with a local GLUE "
                        f"copy (e.g. --data-dir ../shared/data/glue)") from None
    fa, fb = task.hub_fields
    out = {}
    for hub_split, name in (("train", "train"),) + tuple(task.hub_dev_splits):
        rows = ds[hub_split]
        labels = rows["label"]
        a = rows[fa]
        b = rows[fb] if fb else [None] * len(a)
        exs = []
        for i, (ta, tb, y) in enumerate(zip(a, b, labels)):
            if not task.is_regression and not 0 <= int(y) < task.num_labels:
                raise UserError(f"{dataset_id}/{task.name} {hub_split} row {i}: label {y} "
                                f"outside 0..{task.num_labels - 1}")
            exs.append(Example(ta, tb, float(y) if task.is_regression else int(y)))
        out[name] = exs
    return out


# ----------------------------------------------------------------------------------------------
# protocols


@dataclass
class Splits:
    train: list[Example]
    select: list[Example]                # the split the best epoch is chosen on
    report: dict[str, list[Example]]     # split name -> examples the score is reported on
    select_name: str
    train_total: int                     # size of the train split before max_train_samples


def subsample(examples: list[Example], n: int, seed: int) -> list[Example]:
    """A fixed random subset of ``n`` examples (all when n <= 0 or n >= len)."""
    if n <= 0 or n >= len(examples):
        return list(examples)
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    return [examples[i] for i in sorted(idx[:n])]


def carve(examples: list[Example], seed: int,
          fractions: tuple = (0.8, 0.1, 0.1)) -> tuple[list, list, list]:
    """Shuffle with a fixed seed and cut into train / val / test (80/10/10 by default)."""
    idx = list(range(len(examples)))
    random.Random(seed).shuffle(idx)
    n = len(idx)
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    pick = lambda ids: [examples[i] for i in ids]  # noqa: E731
    return pick(idx[:n_train]), pick(idx[n_train:n_train + n_val]), pick(idx[n_train + n_val:])


def make_splits(task: Task, raw: dict[str, list[Example]], protocol: str, *, carve_seed: int,
                max_train_samples: int = 0, max_eval_samples: int = 0,
                sample_seed: int = 0) -> Splits:
    if protocol == "dev":
        train = raw["train"]
        report = {name: raw[name] for name in task.dev_splits}
        select_name = "dev"
    elif protocol == "carved":
        pooled = list(raw["train"])
        for name in task.dev_splits:
            pooled += raw[name]
        train, val, test = carve(pooled, carve_seed)
        report = {"test": test}
        raw = {"val": val}
        select_name = "val"
    else:
        raise UserError(f"run.protocol: must be dev or carved (got {protocol!r})")
    total = len(train)
    train = subsample(train, max_train_samples, sample_seed)
    report = {k: subsample(v, max_eval_samples, sample_seed) for k, v in report.items()}
    select = report["dev"] if protocol == "dev" else subsample(raw["val"], max_eval_samples,
                                                                sample_seed)
    return Splits(train, select, report, select_name, total)


def load_raw(task: Task, data_dir: str = "") -> dict[str, list[Example]]:
    return read_local(task, data_dir) if data_dir else read_hub(task)
