"""The frozen teacher, and the preparation of one that ships without an MLM head.

A sentence encoder such as all-MiniLM-L6-v2 has no ``cls.predictions`` weights; distilling from
a random head would teach the student noise. Such a checkpoint is first fitted as a masked LM
on the training stream (head, plus its top encoder layers where that pays), saved, and reused.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .cli import UserError
from .data.loader import open_pretrain_stream
from .data.masking import DynamicMasker
from .losses import gather_rows
from .models import freeze, load_bert_mlm, resolve_model_path

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    import os

    return Path(os.environ.get("DISTIL_SCALE_CACHE", Path.home() / ".cache" / "distil_scale"))


def make_masker(tokenizer, mcfg, *, seed: int, counts=None) -> DynamicMasker:
    return DynamicMasker(
        len(tokenizer), tokenizer.all_special_ids, tokenizer.mask_token_id,
        mlm_prob=mcfg.mlm_prob, mask_frac=mcfg.mask_frac, random_frac=mcfg.random_frac,
        keep_frac=mcfg.keep_frac, token_counts=counts, smoothing=mcfg.smoothing, seed=seed)


def make_eval_masker(tokenizer, mcfg) -> DynamicMasker:
    """Held-out masks: a fixed seed and no frequency smoothing, so every evaluation scores the
    same positions and every token type counts as it occurs in text."""
    return make_masker(tokenizer, dataclasses.replace(mcfg, smoothing=0.0), seed=12345)


def fixed_eval_batches(eval_ids: torch.Tensor, masker: DynamicMasker, batch: int):
    """Masks drawn once with a fixed seed so every evaluation scores the same positions."""
    out = []
    for i in range(0, len(eval_ids), batch):
        ids = eval_ids[i:i + batch]
        out.append(masker(ids, torch.ones_like(ids), step=-1))
    return out


@torch.no_grad()
def mlm_eval(forward, batches, device, autocast) -> tuple[float, float]:
    """Held-out masked-token loss and accuracy; ``forward(ids, mask, positions) -> logits``."""
    tot_loss, correct, n = 0.0, 0, 0
    for mb in batches:
        with autocast():
            logits = forward(mb.input_ids.to(device), mb.attention_mask.to(device),
                             mb.masked_rows.to(device))
        labels = mb.labels.to(device)
        tot_loss += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        correct += (logits.argmax(-1) == labels).sum().item()
        n += labels.numel()
    return tot_loss / max(n, 1), correct / max(n, 1)


def _head_logits(mlm, ids, mask, positions):
    hidden = mlm.bert(input_ids=ids, attention_mask=mask)[0]
    return mlm.cls(gather_rows(hidden, positions))


def check_tokenizer(tokenizer, model, path: str) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"teacher.name_or_path: tokenizer of '{path}' has {len(tokenizer)} "
                        f"tokens but the model's vocab_size is {model.config.vocab_size}; "
                        "use the tokenizer saved with this checkpoint")


def load_teacher(cfg, tokenizer, device: torch.device, autocast, eval_ids: torch.Tensor,
                 token_counts, *, is_main: bool = True, barrier=lambda: None, say=print):
    """The frozen teacher (BertForMaskedLM) and a dict describing where it came from.

    ``token_counts()`` returns the training text's token frequencies (read once, shared with
    the trainer's smoothed masking)."""
    path = resolve_model_path(cfg.teacher.name_or_path)
    attn = "eager" if device.type == "cpu" else "sdpa"
    model, head_missing = load_bert_mlm(path, attn)
    check_tokenizer(tokenizer, model, path)
    info = {"path": path, "prepared": False}
    if head_missing:
        tc = cfg.teacher
        if tc.prepare_steps == 0:
            raise UserError(f"teacher.name_or_path: '{path}' has no MLM head (cls.predictions.* "
                            "missing), and distilling from a random head teaches noise; set "
                            "teacher.prepare_steps > 0 to fit one, or use a masked-LM checkpoint")
        key = hashlib.sha1(json.dumps([path, tc.prepare_steps, tc.prepare_unfreeze_layers,
                                       tc.prepare_unfreeze_embeddings,
                                       tc.prepare_lr, tc.prepare_head_lr, tc.prepare_batch,
                                       cfg.data.source, cfg.data.max_seq_len, cfg.run.seed,
                                       cfg.data.heldout_fraction,
                                       # smoothed masking prepares another head; the list
                                       # only grows when it is on, so older keys stay valid
                                       *([cfg.masking.smoothing] if cfg.masking.smoothing
                                         else [])]).encode()).hexdigest()[:12]
        pdir = Path(tc.prepared_dir) if tc.prepared_dir else default_cache_dir() / "teachers" / key
        if not (pdir / "PREPARED.json").is_file() and is_main:
            say(f"teacher: '{path}' has no MLM head; preparing it for {tc.prepare_steps} steps "
                f"(head + top {min(tc.prepare_unfreeze_layers, model.config.num_hidden_layers)} "
                f"layers) -> {pdir}")
            prepare_head(model, tokenizer, cfg, device, autocast, eval_ids, token_counts(), pdir,
                         say)
        barrier()
        meta = json.loads((pdir / "PREPARED.json").read_text())
        from transformers import BertForMaskedLM

        model = BertForMaskedLM.from_pretrained(pdir, attn_implementation=attn)
        info.update(prepared=True, prepared_dir=str(pdir), **meta)
        say(f"teacher: prepared MLM head from {pdir} (held-out masked-token accuracy "
            f"{meta['acc_before']:.1%} -> {meta['acc_after']:.1%} after {meta['steps']} steps)")
    return freeze(model), info


def prepare_head(model, tokenizer, cfg, device, autocast, eval_ids, counts: torch.Tensor,
                 out_dir: Path, say) -> None:
    tc = cfg.teacher
    t0 = time.time()
    head = model.cls.predictions
    with torch.no_grad():
        # Identity transform + unigram bias: the head starts as "nearest embedding, weighted by
        # frequency" instead of noise, which makes it useful after ~100 steps instead of ~400.
        head.transform.dense.weight.copy_(torch.eye(head.transform.dense.weight.shape[0]))
        head.transform.dense.bias.zero_()
        head.transform.LayerNorm.weight.fill_(1.0)
        head.transform.LayerNorm.bias.zero_()
        p = (counts[:head.bias.numel()].float() + 1.0)
        head.bias.copy_(torch.log(p / p.sum()))
    freeze(model)
    n_layers = model.config.num_hidden_layers
    top = model.bert.encoder.layer[max(0, n_layers - tc.prepare_unfreeze_layers):]
    body = [p for layer in top for p in layer.parameters()] if tc.prepare_unfreeze_layers else []
    if tc.prepare_unfreeze_embeddings:
        body += list(model.bert.embeddings.parameters())
    head_params = list(head.transform.parameters()) + [head.bias]
    for p in body + head_params:
        p.requires_grad_(True)
    model.to(device).train()
    opt = torch.optim.AdamW([{"params": body, "lr": tc.prepare_lr},
                             {"params": head_params, "lr": tc.prepare_head_lr}], weight_decay=0.0)
    from transformers import get_linear_schedule_with_warmup

    sched = get_linear_schedule_with_warmup(opt, max(1, tc.prepare_steps // 10), tc.prepare_steps)
    stream = open_pretrain_stream(cfg.data, tokenizer, tc.prepare_batch,
                                  seed=cfg.run.seed + 101, workers=cfg.data.tokenize_workers)
    masker = make_masker(tokenizer, cfg.masking, seed=cfg.run.seed + 101, counts=counts)
    batches = fixed_eval_batches(eval_ids, make_eval_masker(tokenizer, cfg.masking),
                                 tc.prepare_batch)

    def fwd(ids, mask, pos):
        return _head_logits(model, ids, mask, pos)

    model.eval()
    _, acc0 = mlm_eval(fwd, batches, device, autocast)
    model.train()
    for step in range(1, tc.prepare_steps + 1):
        ids = stream.next_batch()
        mb = masker(ids, torch.ones_like(ids), step)
        with autocast():
            logits = fwd(mb.input_ids.to(device), mb.attention_mask.to(device),
                         mb.masked_rows.to(device))
        loss = F.cross_entropy(logits.float(), mb.labels.to(device))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(body + head_params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == tc.prepare_steps:
            say(f"  teacher prep step {step}/{tc.prepare_steps}  mlm loss {loss.item():.3f}")
    stream.close()  # its tokenizer processes, if any
    model.eval()
    loss1, acc1 = mlm_eval(fwd, batches, device, autocast)
    if not math.isfinite(loss1):
        raise RuntimeError("teacher preparation diverged (non-finite held-out loss)")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta = {"steps": tc.prepare_steps, "unfreeze_layers": tc.prepare_unfreeze_layers,
            "unfreeze_embeddings": tc.prepare_unfreeze_embeddings,
            "acc_before": acc0, "acc_after": acc1, "loss_after": loss1,
            "wall_s": round(time.time() - t0, 1)}
    (tmp / "PREPARED.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
