"""GLUE: task table, readers (hub or local GLUE tsv), metrics, fine-tuning, task distillation,
report. ``launch/finetune.py``, ``launch/distill_task.py`` and ``launch/report.py`` wire these."""
from .tasks import TASKS, Task, get_task  # noqa: F401
