"""Pretraining: :func:`train` builds a run (setup), resumes it (state), and loops one
:func:`train_step` at a time (step) until it exports the student (loop)."""
from .loop import TrainingError, train
from .step import distill_step, train_step

__all__ = ["TrainingError", "distill_step", "train", "train_step"]
