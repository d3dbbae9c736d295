"""Task-specific distillation: a fine-tuned teacher, a student, and
``alpha · KL(softmax(t/T) ‖ softmax(s/T)) · T² + (1 − alpha) · CE(s, y)`` (+ ``alpha_cos`` times
the cosine distance of the last layer's [CLS] vectors). STS-B (regression) uses MSE to the
teacher's output in place of KL, and MSE to the label in place of CE.

The teacher is frozen: in eval mode, outside DDP and the optimizer, run under inference_mode.
It must be a classifier fine-tuned on the task; one whose head would be initialised at random is
refused (see :func:`distil_scale.glue.modeling.load_teacher`).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from ..config import to_dict
from .config import GlueConfig
from ..hub import load_tokenizer, resolve_model_path
from ..losses import soft_target_kl
from .modeling import load_for_finetune, load_teacher, same_vocab, student_from_teacher
from .batches import encode, make_collate, model_inputs
from .rundir import claimed_runtime, default_out_dir
from .runner import Prepared, prepare_data, run_seeds
from .scoring import fmt_metrics, score
from .tasks import Task
from . import metrics as M

INIT_KINDS = ("teacher-layers", "random")


class TaskDistillLoss:
    def __init__(self, teacher, alpha: float, temperature: float, alpha_cos: float,
                 regression: bool):
        self.teacher = teacher
        self.alpha, self.T, self.alpha_cos = alpha, temperature, alpha_cos
        self.regression = regression

    def __call__(self, model, batch: dict):
        import torch
        import torch.nn.functional as F

        labels = batch["labels"]
        want_h = self.alpha_cos > 0
        with torch.inference_mode():
            t_out = self.teacher(**{k: v for k, v in model_inputs(self.teacher, batch).items()
                                    if k != "labels"}, output_hidden_states=want_h)
        # clone outside inference_mode: inference tensors cannot be saved for backward
        t_logits = t_out.logits.float().clone()
        s_out = model(**{k: v for k, v in model_inputs(model, batch).items() if k != "labels"},
                      output_hidden_states=want_h)
        s_logits = s_out.logits.float()
        if self.regression:
            kd = F.mse_loss(s_logits.squeeze(-1), t_logits.squeeze(-1))
            task = F.mse_loss(s_logits.squeeze(-1), labels.float())
        else:
            kd = soft_target_kl(s_logits, t_logits, self.T)
            task = F.cross_entropy(s_logits, labels)
        total = self.alpha * kd + (1 - self.alpha) * task
        parts = {"kd": kd.detach(), "task": task.detach()}
        if want_h:
            t_cls = t_out.hidden_states[-1][:, 0].float().clone()
            s_cls = s_out.hidden_states[-1][:, 0].float()
            cos = 1 - F.cosine_similarity(s_cls, t_cls, dim=-1).mean()
            total = total + self.alpha_cos * cos
            parts["cos"] = cos.detach()
        return total, parts


def _hidden(config) -> int:
    return int(getattr(config, "hidden_size", None) or getattr(config, "dim"))


def distill_task(task: Task, teacher_spec: str, student_spec: str, cfg: GlueConfig) -> dict:
    out_dir = Path(cfg.run.output_dir) if cfg.run.output_dir else \
        default_out_dir(task, student_spec, "-distill")
    with claimed_runtime(cfg, out_dir, task, "distill") as (d, backend, ds):
        splits = prepare_data(task, cfg)          # bad data is refused before any model loads
        t_path = resolve_model_path(teacher_spec, "--teacher")
        init = None
        if student_spec.startswith("init:"):
            init = student_spec[5:]
            if init not in INIT_KINDS:
                raise UserError(f"--student: unknown init '{student_spec}'; use a model "
                                "directory, a hub id, or one of "
                                + ", ".join(f"init:{k}" for k in INIT_KINDS))
            s_path = None
        else:
            s_path = resolve_model_path(student_spec, "--student")
        teacher = load_teacher(t_path, task, spec=teacher_spec)
        teacher.to(d.device).eval().requires_grad_(False)
        tokenizer = load_tokenizer(t_path, "--teacher", fast=False)
        if s_path is not None:
            s_tok = load_tokenizer(s_path, "--student", fast=False)
            if not same_vocab(tokenizer, s_tok):
                raise UserError(f"--student: '{student_spec}' has a different vocabulary from "
                                f"the teacher '{teacher_spec}'; both must read the same input ids")

        # the teacher's score on the selection split: a teacher at the majority baseline
        # has nothing to teach
        rows = encode(tokenizer, splits.select, cfg.data.max_length)
        collate = make_collate(tokenizer.pad_token_id or 0, task.is_regression)
        t_metrics = score(task, "dev", teacher, rows, collate, d, cfg)
        base = M.majority_baseline(task, [e.label for e in splits.train], "dev",
                                   [e.label for e in splits.select])
        d.say(f"teacher {teacher_spec}: {splits.select_name} {fmt_metrics(t_metrics, base)}")
        if t_metrics[task.main_metric] <= base[task.main_metric]:
            d.say(f"warning: the teacher does not beat the majority baseline on "
                  f"{splits.select_name} ({task.main_metric}); its soft labels carry little")

        def build(seed: int):
            if init is not None:
                student, layers = student_from_teacher(teacher, cfg.distill.student_layers,
                                                       init, seed)
                info = {"init": init, "teacher_layers": layers}
            else:
                student, new = load_for_finetune(s_path, task, "--student")
                info = {"init": "pretrained", "new_weights": new}
            if cfg.distill.alpha_cos > 0 and _hidden(student.config) != _hidden(teacher.config):
                raise UserError(f"distill.alpha_cos: the cosine term needs equal hidden sizes "
                                f"(student {_hidden(student.config)}, teacher "
                                f"{_hidden(teacher.config)}); set distill.alpha_cos=0")
            info.update(cls=type(student).__name__,
                        params=sum(p.numel() for p in student.parameters()))
            return student, info

        prep = Prepared(task, splits, tokenizer, student_spec, out_dir, backend, ds)
        loss = TaskDistillLoss(teacher, cfg.distill.alpha, cfg.distill.temperature,
                               cfg.distill.alpha_cos, task.is_regression)
        extra = {"mode": "distill", "teacher": teacher_spec, "student": student_spec,
                 "teacher_metrics": t_metrics, "distill": to_dict(cfg.distill)}
        return run_seeds(prep, cfg, build, loss, d, extra)

