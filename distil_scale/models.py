"""Teacher loading, student construction and initialisation, and the two thin wrappers the
engines see. What differs between model families (BERT, RoBERTa, ELECTRA, ...) is read from
the table in :mod:`families`; nothing here branches on the model type.

The wrappers exist so that a training step calls ``module(...)`` exactly once: DDP, FSDP2 and
DeepSpeed only see gradients and parameters through a wrapped module's forward, and going
through the stock ``*ForMaskedLM.forward`` would compute vocabulary logits at every position
(most of which no loss reads).
"""
from __future__ import annotations

import copy
import logging
from typing import Optional

import torch
from torch import nn

from .errors import UserError
from .families import attn_for, family_of, student_family
from .losses import Features, VocabTargets, fused_vocab_loss, gather_rows

log = logging.getLogger(__name__)


def even_layer_map(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layer for each student layer, spread over the depth.

    round(i * (L_t - 1) / (L_s - 1)) gives the DistilBERT paper's 0,2,4,7,9,11 for 12 -> 6.
    """
    if n_student == 1:
        return [n_teacher - 1]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


def student_config(tconf, family: str, n_layers: int, dim: int = 0, dropout: float = 0.1,
                   attention_dropout: float = 0.1, attn_implementation: str = "eager"):
    """The student's config: the teacher's own with fewer layers for a same-family student, or
    a DistilBERT one carrying the teacher's shapes; ``dim`` (0: the teacher's) narrows it."""
    fam = student_family(tconf, family)
    attn = attn_for(fam.cls(), attn_implementation)
    if fam is family_of(tconf):
        conf = copy.deepcopy(tconf)
        conf.num_hidden_layers = n_layers
        for name, p in zip(fam.dropout_fields, (dropout, attention_dropout)):
            setattr(conf, name, p)
        conf._attn_implementation = attn
        conf.dtype = None  # built in fp32 whatever dtype the teacher was loaded in
    else:
        conf = fam.config_from(tconf, n_layers, dropout, attention_dropout, attn)
    if dim and dim != conf.hidden_size:
        _narrow(conf, fam, dim)
    return conf


def _narrow(conf, fam, dim: int) -> None:
    """Width ``dim`` with the teacher's head count and FFN ratio (4 x dim for BERT shapes)."""
    if dim % conf.num_attention_heads:
        raise UserError(f"student.dim: {dim} is not divisible by the "
                        f"{conf.num_attention_heads} attention heads")
    old = conf.hidden_size
    setattr(conf, fam.ffn_field, fam.ffn_size(conf) * dim // old)
    # widths tied to the hidden size follow it (ELECTRA's and DeBERTa's embedding_size when it
    # equals the hidden size, DeBERTa's pooler); a factorised embedding keeps its own width
    for name in ("embedding_size", "pooler_hidden_size"):
        if getattr(conf, name, None) == old:
            setattr(conf, name, dim)
    conf.hidden_size = dim


@torch.no_grad()
def init_student_from_teacher(student, teacher, layers: list[int], truncate: bool = False) -> None:
    """Copy embeddings, the chosen teacher layers and the MLM head into the student.

    ``truncate``: a narrower student takes the leading rows/columns of every teacher tensor
    (the first ``dim`` features of each; head boundaries are not respected, so this is a
    starting point that keeps the embeddings' and head's leading directions, not a model that
    computes what the teacher computes).
    """
    for dst, src in _teacher_sources(student, teacher, layers):
        if truncate:
            if any(s < d for s, d in zip(src.shape, dst.shape)):
                raise UserError(f"student.init: truncate cannot widen {tuple(src.shape)} to "
                                f"{tuple(dst.shape)}; use student.init=random")
            src = src[tuple(slice(0, n) for n in dst.shape)]
        if src.shape != dst.shape:
            raise ValueError(f"teacher init: shape {tuple(src.shape)} into {tuple(dst.shape)}")
        dst.copy_(src)
    student.tie_weights()


def _teacher_sources(student, teacher, layers: list[int]) -> list[tuple]:
    """(student tensor, teacher tensor) pairs: by name within a family, by piece across."""
    s_fam, t_fam = family_of(student), family_of(teacher)
    if s_fam is t_fam:
        return _sources_by_name(student, teacher, layers, s_fam)
    return _sources_by_piece(student, teacher, layers, s_fam, t_fam)


def _sources_by_name(student, teacher, layers, fam) -> list[tuple]:
    """Same family: every student tensor has a teacher namesake; layer i reads layers[i]."""
    t_state = teacher.state_dict()
    prefix = f"{fam.base}.{fam.layers_path}."
    pairs = []
    for name, dst in student.state_dict(keep_vars=True).items():
        src = name
        if name.startswith(prefix):
            idx, rest = name[len(prefix):].split(".", 1)
            src = f"{prefix}{layers[int(idx)]}.{rest}"
        pairs.append((dst, t_state[src]))
    return pairs


def _sources_by_piece(student, teacher, layers, s_fam, t_fam) -> list[tuple]:
    """A BERT-shaped teacher into a DistilBERT student, piece by piece.

    BERT adds token_type_embeddings[0] to every token of a single-segment input; DistilBERT has
    no segment embeddings, so that row is folded into the position embeddings and the student's
    embedding output equals the teacher's exactly (the original extraction dropped it). The
    teacher's positions start at its offset (RoBERTa: padding_idx + 1).
    """
    se, te = s_fam.embeddings(student), t_fam.embeddings(teacher)
    t_width = te.word_embeddings.weight.shape[1]
    if t_width != teacher.config.hidden_size:
        raise UserError(f"student.family: a {s_fam.model_type} student needs the teacher's "
                        f"embeddings as wide as its hidden states ({t_width} vs "
                        f"{teacher.config.hidden_size}); use student.family=auto")
    n_pos = se.position_embeddings.weight.shape[0]
    off = t_fam.position_offset(teacher.config)
    pos = te.position_embeddings.weight[off:off + n_pos]
    if getattr(se, "token_type_embeddings", None) is None and \
            getattr(te, "token_type_embeddings", None) is not None:
        pos = pos + te.token_type_embeddings.weight[0]
    pairs = [(se.word_embeddings.weight, te.word_embeddings.weight),
             (se.position_embeddings.weight, pos)]
    pairs += _param_pairs(se.LayerNorm, te.LayerNorm)
    for s_idx, t_idx in enumerate(layers):
        s_layer, t_layer = s_fam.layers(student)[s_idx], t_fam.layers(teacher)[t_idx]
        for part in s_fam.layer_parts:
            pairs += _param_pairs(s_fam.layer_part(s_layer, part), t_fam.layer_part(t_layer, part))
    (s_dense, s_norm, s_bias), (t_dense, t_norm, t_bias) = (s_fam.head_pieces(student),
                                                            t_fam.head_pieces(teacher))
    return pairs + _param_pairs(s_dense, t_dense) + _param_pairs(s_norm, t_norm) + [
        (s_bias, t_bias)]


def _param_pairs(dst: nn.Module, src: nn.Module) -> list[tuple]:
    return [(p, src.get_parameter(name)) for name, p in dst.named_parameters()]


def build_student(teacher, cfg_student, attn_implementation: str = "eager"):
    """The student (a stock ``*ForMaskedLM``) and the teacher layer each student layer copies.

    ``cfg_student.family`` "auto" gives the teacher family's default student (DistilBERT for
    BERT, the teacher's own family otherwise). A narrower student's hidden states reach the
    teacher's width through the projection that :class:`StudentForDistillation` owns.
    """
    tconf = teacher.config
    init = cfg_student.init
    dim = cfg_student.dim or tconf.hidden_size
    if dim != tconf.hidden_size and init == "teacher":
        raise UserError(f"student.init: teacher copies {tconf.hidden_size}-wide weights into a "
                        f"{dim}-wide student (student.dim); use student.init=truncate (leading "
                        "rows/columns) or student.init=random, or student.dim=0")
    n_t = tconf.num_hidden_layers
    layers = list(cfg_student.layers) or even_layer_map(n_t, cfg_student.n_layers)
    if len(layers) != cfg_student.n_layers:
        raise UserError(f"student.layers: {len(layers)} layers listed for "
                        f"student.n_layers={cfg_student.n_layers}; list one per student layer")
    if any(not 0 <= i < n_t for i in layers):
        raise UserError(f"student.layers: {layers} out of range for a {n_t}-layer teacher")
    if cfg_student.n_layers > n_t:
        raise UserError(f"student.n_layers: {cfg_student.n_layers} > the teacher's {n_t} layers")
    family = cfg_student.family
    sconf = student_config(tconf, family, cfg_student.n_layers, dim, cfg_student.dropout,
                           cfg_student.attention_dropout, attn_implementation)
    fam = family_of(sconf)
    student = fam.cls()(sconf)
    if init in ("teacher", "truncate"):
        init_student_from_teacher(student, teacher, layers, truncate=init == "truncate")
    if cfg_student.freeze_position_embeddings:
        table = fam.embeddings(student).position_embeddings
        if table is None:
            raise UserError(f"student.freeze_position_embeddings: a {fam.model_type} student "
                            "with relative positions has no position table; set it false")
        # the release's --freeze_pos_embs: no engine puts a parameter without grad in its
        # optimizer, so the copied teacher positions stay as they are
        table.weight.requires_grad_(False)
    return student, layers


# ----------------------------------------------------------------------------------------------
# the wrappers the engines see


def _keep_first_output(module, args, output) -> None:
    """Forward hook: the module's first output of a forward. DeBERTa-v2 calls its key/query
    projections a second time, on the relative-position embeddings. Kept on the module itself,
    so a deep copy of a wrapper (hooks and all) captures into its own modules."""
    if getattr(module, "_distil_out", None) is None:
        module._distil_out = output


class _Capture:
    """The q/k/v outputs of one encoder layer, through forward hooks on the stock Linear
    modules (no hand-written attention)."""

    def __init__(self, family, mlm, layer: int):
        self.family, self.layer = family, layer
        for m in family.qkv(mlm, layer):
            m.register_forward_hook(_keep_first_output)

    def start(self, mlm) -> None:
        for m in self.family.qkv(mlm, self.layer):
            m._distil_out = None

    def take(self, mlm) -> tuple:
        mods = self.family.qkv(mlm, self.layer)
        out = tuple(m._distil_out for m in mods)
        for m in mods:
            m._distil_out = None  # hold no activations after the forward
        return out


class StudentForDistillation(nn.Module):
    """A stock ``*ForMaskedLM`` student, with vocabulary logits only at the positions asked for.

    ``teacher_dim``: the teacher's width where a hidden-state loss compares a narrower student
    with it: a learned Linear owned here (so it is trained and sharded with the student, and
    applied inside forward, the only place DDP/FSDP let a parameter be used) and not exported
    (the export saves ``.mlm``). ``layers``: return every layer's output; ``qkv``: the last
    layer's q/k/v (the attention-relation loss).
    """

    def __init__(self, mlm, *, teacher_dim: int = 0, layers: bool = False, qkv: bool = False):
        super().__init__()
        self.mlm = mlm
        self.family = family_of(mlm)
        self.spec = {"teacher_dim": teacher_dim, "layers": layers, "qkv": qkv}
        width = mlm.config.hidden_size
        self.proj = nn.Linear(width, teacher_dim) if teacher_dim and teacher_dim != width else None
        self.layers = layers
        n = mlm.config.num_hidden_layers
        self._qkv = _Capture(self.family, mlm, n - 1) if qkv else None

    def forward(self, input_ids, attention_mask, positions,
                vocab: Optional[VocabTargets] = None) -> Features:
        """``positions``: flat row indices into B*L (the training step), or a (B, L) mask.
        ``vocab``: run the fused vocabulary loss at those rows instead of returning logits
        (here, inside forward, where ZeRO-3 and FSDP2 have the output projection gathered)."""
        if self._qkv is not None:
            self._qkv.start(self.mlm)
        out = self.family.encode(self.mlm, input_ids, attention_mask, hidden_states=self.layers)
        hidden = out[0]
        rows = gather_rows(hidden, positions)
        if vocab is None:
            logits, fused = self.family.head_logits(self.mlm, rows), ()
        else:
            transform, weight, bias = self.family.head_projection(self.mlm)
            logits, fused = None, fused_vocab_loss(transform(rows), weight, bias, vocab)
        to_t = self.proj if self.proj is not None else (lambda x: x)
        return Features(
            hidden, logits,
            layers=tuple(to_t(h) for h in out.hidden_states[1:]) if self.layers else (),
            qkv=self._qkv.take(self.mlm) if self._qkv is not None else (),
            aligned=self.proj(hidden) if self.proj is not None else None,
            vocab=fused)

    def projection_parameters(self) -> list:
        """The output projection's weight and bias: parameters the fused loss reads without
        calling the module that owns them (ZeRO-3 must be told to gather them)."""
        _, weight, bias = self.family.head_projection(self.mlm)
        return [p for p in (weight, bias) if p is not None]


def rebuild_student(module: nn.Module, full_state: dict) -> nn.Module:
    """A new unwrapped StudentForDistillation on CPU holding ``full_state`` (as fp32).

    The same stock class as the trained student (from the family table, not ``type()``: a
    sharded module's class is a generated FSDP subclass), wrapped as it was (its projection to
    the teacher's width included); the export saves ``.mlm`` only."""
    fam = family_of(module.mlm.config)
    student = StudentForDistillation(fam.cls()(module.mlm.config),
                                     **getattr(module, "spec", {}))
    missing, unexpected = student.load_state_dict(
        {k: v.float() if v.is_floating_point() else v for k, v in full_state.items()},
        strict=False)
    # a tied tensor may come under either of its names; tie_weights restores the other
    ties = [{f"mlm.{n}" for n in pair} for pair in fam.tied_pairs(student.mlm)]
    untied = set(missing) - set().union(*ties)
    if unexpected or untied or any(t <= set(missing) for t in ties):
        raise RuntimeError(f"student export: missing {sorted(missing)}, "
                           f"unexpected {sorted(unexpected)}")
    student.mlm.tie_weights()
    return student


class TeacherForDistillation(nn.Module):
    """The frozen teacher: last hidden states and vocabulary logits at ``positions``; with
    ``layers`` also those layers' outputs (in that order), with ``qkv_layer`` that layer's
    q/k/v (negative counts from the top)."""

    def __init__(self, mlm, *, layers: tuple = (), qkv_layer: Optional[int] = None):
        super().__init__()
        self.mlm = mlm
        self.family = family_of(mlm)
        self.layers = tuple(layers)
        n = mlm.config.num_hidden_layers
        self._qkv = None if qkv_layer is None else _Capture(self.family, mlm, qkv_layer % n)
        freeze(self)

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: never dropout, whoever calls .train()

    def forward(self, input_ids, attention_mask, positions, logits: bool = True) -> Features:
        """``logits=False``: the rows through the head transform only (``head_rows``), for
        the fused loss, which projects them chunk by chunk (``projection()``)."""
        if self._qkv is not None:
            self._qkv.start(self.mlm)
        out = self.family.encode(self.mlm, input_ids, attention_mask,
                                 hidden_states=bool(self.layers))
        hidden = out[0]
        rows = gather_rows(hidden, positions)
        if logits:
            head_logits, head_rows = self.family.head_logits(self.mlm, rows), None
        else:
            head_logits, head_rows = None, self.family.head_projection(self.mlm)[0](rows)
        return Features(
            hidden, head_logits,
            layers=tuple(out.hidden_states[i + 1] for i in self.layers),
            qkv=self._qkv.take(self.mlm) if self._qkv is not None else (),
            head_rows=head_rows)

    def projection(self) -> tuple:
        """(weight (V, D), bias (V,) or None) of the output projection."""
        return self.family.head_projection(self.mlm)[1:]


def wrap_for_distillation(teacher_mlm, student_mlm, layer_map: list[int], cfg_loss):
    """(TeacherForDistillation, StudentForDistillation) capturing what ``cfg_loss`` reads and
    nothing more: the default objective gets plain wrappers."""
    t_dim, s_dim = teacher_mlm.config.hidden_size, student_mlm.config.hidden_size
    hidden_terms = cfg_loss.alpha_cos > 0 or cfg_loss.alpha_hidden_mse > 0
    mapped = cfg_loss.alpha_hidden_mse > 0 and cfg_loss.hidden_mse_layers == "mapped"
    rel = cfg_loss.alpha_attn_rel > 0
    t_layer = cfg_loss.attn_rel_teacher_layer
    n_t = teacher_mlm.config.num_hidden_layers
    if rel:
        if not -n_t <= t_layer < n_t:
            raise UserError(f"loss.attn_rel_teacher_layer: {t_layer} out of range for a "
                            f"{n_t}-layer teacher; use -1 (the last) or 0..{n_t - 1}")
        heads = relation_heads(cfg_loss, teacher_mlm.config)
        if t_dim % heads or s_dim % heads:
            raise UserError(f"loss.attn_rel_heads: {heads} relation heads must divide both "
                            f"the teacher's width {t_dim} and the student's {s_dim}")
    teacher = TeacherForDistillation(teacher_mlm, layers=tuple(layer_map) if mapped else (),
                                     qkv_layer=t_layer if rel else None)
    student = StudentForDistillation(student_mlm, teacher_dim=t_dim if hidden_terms else 0,
                                     layers=mapped, qkv=rel)
    return teacher, student


def relation_heads(cfg_loss, teacher_config) -> int:
    """``loss.attn_rel_heads``, where 0 means the teacher's attention head count."""
    return cfg_loss.attn_rel_heads or teacher_config.num_attention_heads


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
