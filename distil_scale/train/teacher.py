"""The frozen teacher, and the preparation of one that ships without an MLM head.

Preparing is a short training run (the plain engine and :func:`train_step`), which is why it
lives here with the loops and not beside the cache keys in :mod:`distil_scale.teacher`.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import families
from ..data.stream import open_pretrain_stream
from ..data.masking import make_eval_masker, make_masker
from ..distributed import barrier
from ..engine import OptimSpec, make_engine
from ..errors import UserError
from ..evaluate import fixed_eval_batches, mlm_eval
from ..families import load_mlm
from ..fsio import replace_dir
from ..hub import resolve_model_path
from ..losses import gather_rows
from ..metrics import MetricsLogger
from ..models import freeze
from ..teacher import check_prepared, check_tokenizer, prepared_key, shared_cache
from .step import train_step


def load_teacher(cfg, tokenizer, rt, eval_ids: torch.Tensor, token_counts):
    """The frozen teacher (a stock masked LM) and a dict describing where it came from.

    ``rt``: the run's :class:`~distil_scale.runtime.Runtime`. ``token_counts()`` returns the
    training text's token frequencies (read once, shared with the trainer's smoothed masking).
    A headless teacher is prepared by rank 0 alone; the others wait and load what it saved."""
    path = resolve_model_path(cfg.teacher.name_or_path)
    model, head_missing = load_mlm(path, rt.attn)
    check_tokenizer(tokenizer, model, path)
    info = {"path": path, "prepared": False}
    if head_missing:
        tc = cfg.teacher
        if tc.prepare_steps == 0:
            head = "/".join(f"{p}*" for p in families.family_of(model).head_prefixes)
            raise UserError(f"teacher.name_or_path: '{path}' has no MLM head ({head} "
                            "missing), and distilling from a random head teaches noise; set "
                            "teacher.prepare_steps > 0 to fit one, or use a masked-LM checkpoint")
        pdir = Path(tc.prepared_dir) if tc.prepared_dir else \
            shared_cache(cfg, rt) / prepared_key(cfg, path)
        if not (pdir / "PREPARED.json").is_file() and rt.is_main:
            top = min(tc.prepare_unfreeze_layers, model.config.num_hidden_layers)
            rt.say(f"teacher: '{path}' has no MLM head; preparing it for {tc.prepare_steps} "
                   f"steps (head + top {top} layers) -> {pdir}")
            prepare_head(model, tokenizer, cfg, rt, eval_ids, token_counts(), pdir, path)
        barrier()
        meta = json.loads((pdir / "PREPARED.json").read_text())
        if tc.prepared_dir or "key" in meta:  # the default cache dir is named by the key itself
            check_prepared(meta, pdir, path, prepared_key(cfg, path))
        model, _ = load_mlm(str(pdir), rt.attn)
        info.update(prepared=True, prepared_dir=str(pdir), **meta)
        rt.say(f"teacher: prepared MLM head from {pdir} (held-out masked-token accuracy "
               f"{meta['acc_before']:.1%} -> {meta['acc_after']:.1%} after {meta['steps']} steps)")
    return freeze(model), info



class _HeadFit(nn.Module):
    """The masked LM with vocabulary logits only at the masked positions: one module call per
    step, as every engine expects."""

    def __init__(self, mlm):
        super().__init__()
        self.mlm = mlm

    def forward(self, ids, mask, positions):
        hidden = families.encode(self.mlm, ids, mask)[0]
        return families.head_logits(self.mlm, gather_rows(hidden, positions))


def prepare_head(model, tokenizer, cfg, rt, eval_ids, counts: torch.Tensor,
                 out_dir: Path, source: str) -> None:
    """Fit the head (and the top layers) as a masked LM on the training stream; PREPARED.json
    records ``source`` (the teacher's path) and the settings' key it was prepared for.

    It runs on rank 0 alone while the other ranks wait, so it takes the plain engine: the
    run's precision, loss scaling, clipping and non-finite guard, without a process group."""
    tc = cfg.teacher
    t0 = time.time()
    families.reset_head(model, counts)  # identity transform + unigram bias, not noise
    freeze(model)
    n_layers = model.config.num_hidden_layers
    top = families.layers(model)[max(0, n_layers - tc.prepare_unfreeze_layers):]
    body = [p for layer in top for p in layer.parameters()] if tc.prepare_unfreeze_layers else []
    if tc.prepare_unfreeze_embeddings:
        body += list(families.embeddings(model).parameters())
    head_params = families.head_parameters(model)
    for p in body + head_params:
        p.requires_grad_(True)
    fit = _HeadFit(model)
    optim = OptimSpec(lr=tc.prepare_lr, total_steps=tc.prepare_steps,
                      warmup_steps=max(1, tc.prepare_steps // 10), max_grad_norm=1.0,
                      groups=[{"params": body, "lr": tc.prepare_lr, "weight_decay": 0.0},
                              {"params": head_params, "lr": tc.prepare_head_lr,
                               "weight_decay": 0.0}])
    engine = make_engine("plain", fit, optim, precision=rt.precision, accum_steps=1,
                         device=rt.device)
    stream = open_pretrain_stream(cfg.data, tokenizer, tc.prepare_batch,
                                  seed=cfg.run.seed + 101, workers=cfg.data.tokenize_workers)
    masker = make_masker(tokenizer, cfg.masking, seed=cfg.run.seed + 101, counts=counts)
    batches = fixed_eval_batches(eval_ids, make_eval_masker(tokenizer, cfg.masking),
                                 tc.prepare_batch)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    metrics = MetricsLogger(tmp, tensorboard=cfg.metrics.tensorboard)

    def evaluate(step: int) -> tuple[float, float]:
        fit.eval()
        loss, acc = mlm_eval(fit, batches, rt.device, engine.autocast)
        fit.train()
        metrics.log(step, {"eval/teacher_mlm_loss": loss, "eval/teacher_mlm_acc": acc})
        return loss, acc

    def micro_loss(module, mb):
        logits = module(mb.input_ids.to(rt.device), mb.attention_mask.to(rt.device),
                        mb.masked_rows.to(rt.device))
        loss = F.cross_entropy(logits.float(), mb.labels.to(rt.device))
        return loss, {"mlm": loss}

    _, acc0 = evaluate(0)
    fit.train()
    for step in range(1, tc.prepare_steps + 1):
        ids = stream.next_batch()
        out = train_step(engine, lambda: masker(ids, torch.ones_like(ids), step), 1, micro_loss)
        if step % 25 == 0 or step == tc.prepare_steps:
            loss = out.loss.item()
            metrics.log(step, {"loss/mlm": loss, "optim/lr": engine.lr(),
                               "optim/grad_norm": float(out.result.grad_norm)})
            rt.say(f"  teacher prep step {step}/{tc.prepare_steps}  mlm loss {loss:.3f}")
    stream.close()  # its tokenizer processes, if any
    loss1, acc1 = evaluate(tc.prepare_steps)
    metrics.close()
    if not math.isfinite(loss1):
        raise RuntimeError("teacher preparation diverged (non-finite held-out loss)")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {"source": source, "key": prepared_key(cfg, source), "steps": tc.prepare_steps,
            "unfreeze_layers": tc.prepare_unfreeze_layers,
            "unfreeze_embeddings": tc.prepare_unfreeze_embeddings,
            "acc_before": acc0, "acc_after": acc1, "loss_after": loss1,
            "wall_s": round(time.time() - t0, 1)}
    (tmp / "PREPARED.json").write_text(json.dumps(meta, indent=2))
    replace_dir(tmp, out_dir)
