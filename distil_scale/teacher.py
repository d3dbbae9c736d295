"""Where a prepared teacher is kept, and whether a kept one fits this run.

A sentence encoder such as all-MiniLM-L6-v2 has no ``cls.predictions`` weights; distilling from
a random head would teach the student noise. Such a checkpoint is first fitted as a masked LM
on the training stream (:mod:`distil_scale.train.teacher`: a training loop, so it sits above
the engines), saved under a key of the settings it depends on, and reused.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .distributed import unshared
from .errors import UserError


def default_cache_dir() -> Path:
    return Path(os.environ.get("DISTIL_SCALE_CACHE", Path.home() / ".cache" / "distil_scale"))


def check_tokenizer(tokenizer, model, path: str) -> None:
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"teacher.name_or_path: tokenizer of '{path}' has {len(tokenizer)} "
                        f"tokens but the model's vocab_size is {model.config.vocab_size}; "
                        "use the tokenizer saved with this checkpoint")


def shared_cache(cfg, rt) -> Path:
    """Where a prepared teacher is kept: the per-user cache when every rank sees the same one
    (one node, or a shared home), else the run's own directory, which every rank was shown to
    share at start-up: each node's own ~/.cache would hold a head only node 0 prepared."""
    cache = default_cache_dir() / "teachers"
    if rt.world == 1:
        return cache
    missing = unshared(cache)
    if not missing:
        return cache
    here = Path(cfg.run.output_dir) / "prepared-teacher"
    rt.say(f"teacher: {cache} is not shared by every node ({missing[0]} does not see it); the "
           f"prepared teacher goes to {here} (set teacher.prepared_dir, or "
           "DISTIL_SCALE_CACHE, to a shared path to reuse it across runs)")
    return here


def check_prepared(meta: dict, pdir: Path, path: str, key: str) -> None:
    """A prepared teacher is reused only for the teacher and settings it was prepared from."""
    if meta.get("key") == key:
        return
    was = (f"from '{meta['source']}' with other teacher.prepare_* / data settings"
           if meta.get("source") == path else f"from '{meta.get('source')}'" if meta.get("source")
           else "by an older version that did not record from what")
    raise UserError(f"teacher.prepared_dir: '{pdir}' holds a teacher prepared {was}, not for "
                    f"this run's teacher '{path}'; point teacher.prepared_dir at another "
                    "directory (or leave it empty for the per-teacher cache)")


def prepared_key(cfg, path: str) -> str:
    """What the prepared head depends on: a change to any of it prepares another one."""
    tc = cfg.teacher
    return hashlib.sha1(json.dumps([path, tc.prepare_steps, tc.prepare_unfreeze_layers,
                                    tc.prepare_unfreeze_embeddings,
                                    tc.prepare_lr, tc.prepare_head_lr, tc.prepare_batch,
                                    cfg.data.source, cfg.data.max_seq_len, cfg.run.seed,
                                    cfg.data.heldout_fraction,
                                    # smoothed masking prepares another head; the list
                                    # only grows when it is on, so older keys stay valid
                                    *([cfg.masking.smoothing] if cfg.masking.smoothing
                                      else [])]).encode()).hexdigest()[:12]
