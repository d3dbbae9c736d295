"""Loading checkpoints as sequence classifiers: students to fine-tune, teachers to distil from.

Any BERT-family directory or hub id loads through ``AutoModelForSequenceClassification``. A
pretraining export (``DistilBertForMaskedLM``) loads with a newly initialised head: expected for
fine-tuning, refused for a task-distillation teacher.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from ..errors import UserError, first_line
from .. import families
from ..families import FAMILIES, supported
from ..hub import hub_error
from ..models import even_layer_map
from .tasks import Task

# parameters of a sequence-classification head (BERT: pooler + classifier; DistilBERT:
# pre_classifier + classifier)
HEAD_KEY = re.compile(r"(^|\.)(classifier|pre_classifier|pooler)\.")
INFO_FILE = "glue_task.json"


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def _label_kwargs(task: Task) -> dict:
    kw = {"num_labels": task.num_labels}
    if task.is_regression:
        kw["problem_type"] = "regression"
    else:
        kw["problem_type"] = "single_label_classification"
        kw["id2label"] = dict(enumerate(task.labels))
        kw["label2id"] = {n: i for i, n in enumerate(task.labels)}
    return kw


def check_encoder(path: str, flag: str) -> None:
    """A GLUE model is an encoder of a supported family; a decoder such as GPT-2 would load as a
    classifier and fail deep inside its forward."""
    from transformers import AutoConfig

    if not Path(path).is_dir():
        return  # a hub id: from_pretrained names the problem
    try:
        model_type = AutoConfig.from_pretrained(path).model_type
    except (OSError, ValueError) as e:
        raise UserError(f"{flag}: cannot load '{path}' ({first_line(e, 160)})") from None
    if model_type not in FAMILIES:
        raise UserError(f"{flag}: '{path}' is a '{model_type}' model; GLUE fine-tuning here "
                        f"takes an encoder of one of: {supported()}")


def _load_classifier(path: str, flag: str, **kwargs):
    """(model, loading info) of AutoModelForSequenceClassification, or a one-line UserError."""
    from transformers import AutoModelForSequenceClassification

    check_encoder(path, flag)
    _quiet_transformers()
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, output_loading_info=True, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        if Path(path).is_dir():
            raise UserError(f"{flag}: cannot load '{path}' as a sequence classifier "
                            f"({first_line(e)})") from None
        raise hub_error(flag, path, e) from None


def load_for_finetune(path: str, task: Task, flag: str = "--model"):
    """A classifier for ``task``; returns (model, names of newly initialised head weights)."""
    model, info = _load_classifier(path, flag, ignore_mismatched_sizes=True,
                                   **_label_kwargs(task))
    mismatched = {k if isinstance(k, str) else k[0] for k in info.get("mismatched_keys", [])}
    new = sorted(set(info["missing_keys"]) | mismatched)
    return model, new


def load_teacher(path: str, task: Task, flag: str = "--teacher", spec: Optional[str] = None):
    """A FINE-TUNED classifier for ``task``, or a UserError.

    Refused: a checkpoint whose classification head is missing (it would be initialised at
    random: distilling from it teaches noise, the reimplementation report's mistake), one whose
    number of labels differs from the task's, and one fine-tuned for another task.
    """
    model, info = _load_classifier(path, flag)
    name = spec or path
    missing = sorted(k for k in info["missing_keys"] if HEAD_KEY.search(k))
    if missing:
        raise UserError(
            f"{flag}: '{name}' has no trained classification head (missing "
            f"{', '.join(missing)}); a teacher with a randomly initialised head teaches noise. "
            f"Fine-tune it first: python launch/finetune.py --task {task.name} --model {name}")
    n = model.config.num_labels
    if n != task.num_labels:
        raise UserError(f"{flag}: '{name}' has {n} output labels but task {task.name} needs "
                        f"{task.num_labels}")
    info_file = Path(path) / INFO_FILE
    if info_file.is_file():
        saved = json.loads(info_file.read_text()).get("task")
        if saved and saved != task.name:
            raise UserError(f"{flag}: '{name}' was fine-tuned on {saved}, not {task.name}")
    return model


def num_layers(config) -> int:
    return int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layers"))


def student_from_teacher(teacher, layers: Optional[list[int]], init: str, seed: int):
    """A student of the teacher's class and width with fewer layers.

    ``init='teacher-layers'`` copies the embeddings, the chosen layers and the head;
    ``init='random'`` keeps the architecture, fresh weights. By default half the teacher's depth,
    spread as pretraining spreads it (``models.even_layer_map``: 0,2,4,7,9,11 of 12, as the
    DistilBERT paper; 0,2,5 of 6), so a task-distilled student and a pretrained one match.
    """
    import copy

    import torch

    n_t = num_layers(teacher.config)
    if not layers:
        layers = even_layer_map(n_t, (n_t + 1) // 2)
    bad = [i for i in layers if i >= n_t]
    if bad:
        raise UserError(f"distill.student_layers: teacher has {n_t} layers (0..{n_t - 1}); "
                        f"got {bad}")
    cfg = copy.deepcopy(teacher.config)
    cfg.num_hidden_layers = len(layers)  # DistilBertConfig maps this to n_layers
    torch.manual_seed(seed)
    student = type(teacher)(cfg)
    if init == "random":
        return student, layers
    # everything but the layers under the same names (embeddings, pooler, classifier), then
    # each student layer from its teacher layer, found through the family table
    s_keys = set(student.state_dict())
    missing, _ = student.load_state_dict(
        {k: v.detach().clone() for k, v in teacher.state_dict().items() if k in s_keys},
        strict=False)
    assert not missing, missing  # same class and width: every key has a teacher tensor
    s_layers, t_layers = families.layers(student), families.layers(teacher)
    for s_idx, t_idx in enumerate(layers):
        s_layers[s_idx].load_state_dict(t_layers[t_idx].state_dict())
    return student, layers


def same_vocab(tok_a, tok_b) -> bool:
    return tok_a.get_vocab() == tok_b.get_vocab()
