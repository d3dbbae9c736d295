"""The GLUE task table: where each task's text and label live, its labels and its metrics.

Labels are integers in the order the hub's ``nyu-mll/glue`` uses, so a model fine-tuned from the
local tsv files and one fine-tuned from the hub agree on what label 0 means. STS-B is regression
(one float output).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from ..errors import UserError


@dataclass(frozen=True)
class TsvLayout:
    """Columns of one split's tsv file in the original GLUE layout (as the download script wrote it)."""

    n_cols: int
    text_a: int
    text_b: Optional[int]
    label: Optional[int]  # None: an unlabelled (test) file


@dataclass(frozen=True)
class Task:
    name: str                     # our name and the hub config name: cola, sst2, ...
    dir_name: str                 # folder in a local GLUE directory: CoLA, SST-2, ...
    hub_fields: tuple             # (text_a, text_b or None) field names in nyu-mll/glue
    labels: tuple                 # label names in hub order; () for regression
    main_metric: str
    metrics: tuple
    header: bool = True
    # tsv layout per local split; MNLI's train and dev files differ in width
    layouts: dict = field(default_factory=dict)
    # local file stem -> our split name; the first "dev" split selects the model
    dev_files: tuple = (("dev", "dev"),)
    hub_dev_splits: tuple = (("validation", "dev"),)
    # label text in the tsv -> index, when the tsv stores names rather than numbers
    tsv_label_names: bool = False

    @property
    def is_regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return 1 if self.is_regression else len(self.labels)

    @property
    def dev_splits(self) -> list[str]:
        return [name for _, name in self.dev_files]


_BIN = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, Task] = {t.name: t for t in [
    Task("cola", "CoLA", ("sentence", None), ("unacceptable", "acceptable"), "mcc",
         ("mcc", "accuracy"), header=False,
         layouts={"*": TsvLayout(4, 3, None, 1)}),
    Task("sst2", "SST-2", ("sentence", None), ("negative", "positive"), "accuracy",
         ("accuracy",), layouts={"*": TsvLayout(2, 0, None, 1)}),
    Task("mrpc", "MRPC", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"), "f1",
         ("f1", "accuracy"), layouts={"*": TsvLayout(5, 3, 4, 0)}),
    Task("qqp", "QQP", ("question1", "question2"), ("not_duplicate", "duplicate"), "f1",
         ("f1", "accuracy"), layouts={"*": TsvLayout(6, 3, 4, 5)}),
    Task("stsb", "STS-B", ("sentence1", "sentence2"), (), "spearman",
         ("spearman", "pearson"), layouts={"*": TsvLayout(10, 7, 8, 9)}),
    Task("mnli", "MNLI", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
         "accuracy", ("accuracy", "accuracy_mm"),
         layouts={"train": TsvLayout(12, 8, 9, 11), "*": TsvLayout(16, 8, 9, 15)},
         dev_files=(("dev_matched", "dev"), ("dev_mismatched", "dev_mm")),
         hub_dev_splits=(("validation_matched", "dev"), ("validation_mismatched", "dev_mm")),
         tsv_label_names=True),
    Task("qnli", "QNLI", ("question", "sentence"), _NLI2, "accuracy", ("accuracy",),
         layouts={"*": TsvLayout(4, 1, 2, 3)}, tsv_label_names=True),
    Task("rte", "RTE", ("sentence1", "sentence2"), _NLI2, "accuracy", ("accuracy",),
         layouts={"*": TsvLayout(4, 1, 2, 3)}, tsv_label_names=True),
    Task("wnli", "WNLI", ("sentence1", "sentence2"), ("not_entailment", "entailment"),
         "accuracy", ("accuracy",), layouts={"*": TsvLayout(4, 1, 2, 3)}),
]}

# accepted spellings on the command line
_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli"}

# The order of the DistilBERT paper's Table 1.
PAPER_ORDER = ("cola", "mnli", "mrpc", "qnli", "qqp", "rte", "sst2", "stsb", "wnli")
DISPLAY = {"cola": "CoLA", "mnli": "MNLI", "mrpc": "MRPC", "qnli": "QNLI", "qqp": "QQP",
           "rte": "RTE", "sst2": "SST-2", "stsb": "STS-B", "wnli": "WNLI"}


def get_task(name: str) -> Task:
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise UserError(f"--task: unknown task '{name}'; valid tasks: {', '.join(TASKS)}")
    return TASKS[key]


def layout_for(task: Task, split_file: str) -> TsvLayout:
    return task.layouts.get(split_file, task.layouts["*"])
