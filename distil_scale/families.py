"""One table of masked-LM families: what the rest of the code needs to know about each.

Everything family-specific lives here as data or one-line lambdas over the stock transformers
classes, so that teacher loading, student construction, the distillation wrappers and the
engines never branch on the model type. An entry names, for its ``config.model_type``:

- the stock ``*ForMaskedLM`` class, its base-model attribute and how to call it (segment ids:
  zeros where the family has segment embeddings), the encoder layer list and the embeddings;
- the MLM head as a callable hidden rows -> vocabulary logits, its parameter-name prefixes (a
  checkpoint missing them has no head) and its transform/bias pieces (to refit a missing head);
- the pieces of one encoder layer under common names (q, k, v, ...): the relation loss hooks
  q/k/v, and a BERT-shaped layer can be copied into a DistilBERT layer piece by piece;
- the position offset (RoBERTa numbers positions from padding_idx + 1), the tied input/output
  embedding names, and the family a student of this teacher gets by default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from safetensors import SafetensorError
from torch import nn
from torch.nn.functional import gelu

from .errors import UserError, first_line

# a layer's pieces under common names; the three BERT-shaped families share one layout
BERT_LAYER = {"q": "attention.self.query", "k": "attention.self.key",
              "v": "attention.self.value", "attn_out": "attention.output.dense",
              "attn_norm": "attention.output.LayerNorm", "ffn_in": "intermediate.dense",
              "ffn_out": "output.dense", "ffn_norm": "output.LayerNorm"}
DISTILBERT_LAYER = {"q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin",
                    "attn_out": "attention.out_lin", "attn_norm": "sa_layer_norm",
                    "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2", "ffn_norm": "output_layer_norm"}
DEBERTA_LAYER = {**BERT_LAYER, "q": "attention.self.query_proj",
                 "k": "attention.self.key_proj", "v": "attention.self.value_proj"}


@dataclass(frozen=True)
class Family:
    model_type: str
    mlm_class: str  # the stock transformers class
    base: str  # attribute of the base model on the MLM model
    layers_path: str  # the encoder's ModuleList, under the base model
    layer_parts: dict
    # (model, hidden rows (n, D)) -> vocabulary logits (n, V)
    head: Callable
    # (model) -> (transform Linear, transform LayerNorm, output bias Parameter)
    head_pieces: Callable
    # (model) -> (transform: hidden rows -> rows the projection reads, projection weight (V, D),
    # projection bias (V,) or None): the head split before its last matmul, which the fused
    # vocabulary loss computes itself; transform + projection is exactly ``head``
    projection: Callable
    head_prefixes: tuple
    # (output name, input name) pairs that share one tensor; a tie absent from a model (a
    # DeBERTa-v2 head that multiplies by the embeddings directly) is skipped
    tied: tuple
    default_student: str
    # whether the base model adds segment (token type) embeddings
    segments: bool = True
    # a layer computes what a BERT layer computes from the pieces named in layer_parts, so it
    # can be copied into a DistilBERT layer (DeBERTa's relative attention cannot)
    bert_shaped: bool = True
    dropout_fields: tuple = ("hidden_dropout_prob", "attention_probs_dropout_prob")
    ffn_field: str = "intermediate_size"
    # first row of the position table a token at position 0 reads
    position_offset: Callable = field(default=lambda config: 0)
    # (teacher config, n_layers, dropout, attention_dropout, attn) -> this family's config with
    # the teacher's shapes, for a family that can be cut from another BERT-shaped family
    config_from: Callable | None = None

    # -- modules -------------------------------------------------------------------------------
    def cls(self):
        import transformers

        return getattr(transformers, self.mlm_class)

    def base_model(self, model: nn.Module) -> nn.Module:
        return getattr(model, self.base)

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return _resolve(self.base_model(model), self.layers_path)

    def embeddings(self, model: nn.Module) -> nn.Module:
        return self.base_model(model).embeddings

    def layer_part(self, layer: nn.Module, part: str) -> nn.Module:
        return _resolve(layer, self.layer_parts[part])

    def qkv(self, model: nn.Module, layer: int) -> tuple:
        """The query, key and value Linear modules of encoder layer ``layer``."""
        block = self.layers(model)[layer]
        return tuple(self.layer_part(block, p) for p in ("q", "k", "v"))

    # -- calls ---------------------------------------------------------------------------------
    def encode(self, model: nn.Module, input_ids, attention_mask, hidden_states: bool = False):
        """The base model's output: [0] is the last hidden state (B, L, D); with
        ``hidden_states`` also .hidden_states (embeddings, then every layer's output)."""
        kw = {"token_type_ids": torch.zeros_like(input_ids)} if self.segments else {}
        if hidden_states:
            kw["output_hidden_states"] = True
        return self.base_model(model)(input_ids=input_ids, attention_mask=attention_mask, **kw)

    def head_logits(self, model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
        return self.head(model, rows)

    def head_projection(self, model: nn.Module) -> tuple:
        return self.projection(model)

    # -- the head ------------------------------------------------------------------------------
    def head_parameters(self, model: nn.Module) -> list:
        dense, norm, bias = self.head_pieces(model)
        return list(dense.parameters()) + list(norm.parameters()) + [bias]

    @torch.no_grad()
    def reset_head(self, model: nn.Module, counts: torch.Tensor) -> None:
        """Identity transform + log-unigram bias: the head starts as "nearest embedding,
        weighted by frequency" instead of noise, which makes it useful after ~100 steps of
        fitting instead of ~400."""
        dense, norm, bias = self.head_pieces(model)
        # eye of the Linear's shape: ELECTRA's generator head maps hidden -> embedding width
        dense.weight.copy_(torch.eye(*dense.weight.shape))
        dense.bias.zero_()
        norm.weight.fill_(1.0)
        norm.bias.zero_()
        p = counts[:bias.numel()].float() + 1.0
        bias.copy_(torch.log(p / p.sum()))

    def head_missing(self, missing_keys) -> bool:
        return any(k.startswith(self.head_prefixes) for k in missing_keys
                   if k not in self.tied_names())

    # -- names and sizes -----------------------------------------------------------------------
    def tied_names(self) -> set:
        return {n for pair in self.tied for n in pair}

    def tied_pairs(self, model: nn.Module) -> list:
        """The ties this model really has (both names in its state dict)."""
        keys = set(model.state_dict().keys())
        return [pair for pair in self.tied if set(pair) <= keys]

    def max_positions(self, config) -> int:
        """Tokens a sequence may hold: the position table less its offset (RoBERTa: 514 -> 512)."""
        return config.max_position_embeddings - self.position_offset(config)

    def ffn_size(self, config) -> int:
        return getattr(config, self.ffn_field)


def _resolve(module: nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part)
    return module


def _bert_head(m):
    t = m.cls.predictions
    return t.transform.dense, t.transform.LayerNorm, t.bias


def _bert_projection(m):
    p = m.cls.predictions
    return p.transform, p.decoder.weight, p.decoder.bias


def _deberta_projection(m):
    if m.legacy:
        return _bert_projection(m)
    h = m.lm_predictions.lm_head
    return (lambda x: h.LayerNorm(h.transform_act_fn(h.dense(x))),
            m.deberta.embeddings.word_embeddings.weight, h.bias)


def _deberta_head(m):
    if m.legacy:
        return _bert_head(m)
    h = m.lm_predictions.lm_head
    return h.dense, h.LayerNorm, h.bias


def _distilbert_config(tconf, n_layers: int, dropout: float, attention_dropout: float,
                       attn_implementation: str = "eager"):
    """A DistilBERT config with a BERT-shaped teacher's widths, vocabulary and positions."""
    from transformers import DistilBertConfig

    return DistilBertConfig(
        vocab_size=tconf.vocab_size,
        # RoBERTa's table has padding_idx + 1 rows before position 0; DistilBERT's has none
        max_position_embeddings=family_of(tconf).max_positions(tconf),
        sinusoidal_pos_embds=False,
        n_layers=n_layers,
        n_heads=tconf.num_attention_heads,
        dim=tconf.hidden_size,
        hidden_dim=family_of(tconf).ffn_size(tconf),
        dropout=dropout,
        attention_dropout=attention_dropout,
        activation=tconf.hidden_act if tconf.hidden_act in ("gelu", "relu") else "gelu",
        pad_token_id=tconf.pad_token_id if tconf.pad_token_id is not None else 0,
        tie_word_embeddings=True,
        attn_implementation=attn_implementation,
    )


def _roberta(model_type: str, mlm_class: str) -> Family:
    return Family(
        model_type, mlm_class, base="roberta", layers_path="encoder.layer",
        layer_parts=BERT_LAYER,
        head=lambda m, h: m.lm_head(h),
        head_pieces=lambda m: (m.lm_head.dense, m.lm_head.layer_norm, m.lm_head.bias),
        projection=lambda m: (lambda x: m.lm_head.layer_norm(gelu(m.lm_head.dense(x))),
                              m.lm_head.decoder.weight, m.lm_head.decoder.bias),
        head_prefixes=("lm_head.",),
        tied=(("lm_head.decoder.weight", "roberta.embeddings.word_embeddings.weight"),
              ("lm_head.decoder.bias", "lm_head.bias")),
        default_student=model_type,
        # positions are numbered from padding_idx + 1 (fairseq's make_positions)
        position_offset=lambda c: c.pad_token_id + 1)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family(
        "bert", "BertForMaskedLM", base="bert", layers_path="encoder.layer",
        layer_parts=BERT_LAYER,
        head=lambda m, h: m.cls(h),
        head_pieces=_bert_head,
        projection=_bert_projection,
        head_prefixes=("cls.",),
        tied=(("cls.predictions.decoder.weight", "bert.embeddings.word_embeddings.weight"),
              ("cls.predictions.decoder.bias", "cls.predictions.bias")),
        default_student="distilbert"),
    Family(
        "distilbert", "DistilBertForMaskedLM", base="distilbert", layers_path="transformer.layer",
        layer_parts=DISTILBERT_LAYER,
        head=lambda m, h: m.vocab_projector(m.vocab_layer_norm(m.activation(m.vocab_transform(h)))),
        head_pieces=lambda m: (m.vocab_transform, m.vocab_layer_norm, m.vocab_projector.bias),
        projection=lambda m: (lambda x: m.vocab_layer_norm(m.activation(m.vocab_transform(x))),
                              m.vocab_projector.weight, m.vocab_projector.bias),
        head_prefixes=("vocab_transform.", "vocab_layer_norm.", "vocab_projector."),
        tied=(("vocab_projector.weight", "distilbert.embeddings.word_embeddings.weight"),),
        default_student="distilbert", segments=False,
        dropout_fields=("dropout", "attention_dropout"), ffn_field="hidden_dim",
        config_from=_distilbert_config),
    _roberta("roberta", "RobertaForMaskedLM"),
    _roberta("xlm-roberta", "XLMRobertaForMaskedLM"),
    Family(
        # the generator: the discriminator was never trained on masked tokens
        "electra", "ElectraForMaskedLM", base="electra", layers_path="encoder.layer",
        layer_parts=BERT_LAYER,
        head=lambda m, h: m.generator_lm_head(m.generator_predictions(h)),
        head_pieces=lambda m: (m.generator_predictions.dense, m.generator_predictions.LayerNorm,
                               m.generator_lm_head.bias),
        projection=lambda m: (m.generator_predictions, m.generator_lm_head.weight,
                              m.generator_lm_head.bias),
        head_prefixes=("generator_predictions.", "generator_lm_head."),
        tied=(("generator_lm_head.weight", "electra.embeddings.word_embeddings.weight"),),
        default_student="electra"),
    Family(
        "deberta-v2", "DebertaV2ForMaskedLM", base="deberta", layers_path="encoder.layer",
        layer_parts=DEBERTA_LAYER,
        # config.legacy picks the head layout; the non-legacy one multiplies by the embeddings
        head=lambda m, h: m.cls(h) if m.legacy else m.lm_predictions(
            h, m.deberta.embeddings.word_embeddings),
        head_pieces=_deberta_head,
        projection=_deberta_projection,
        head_prefixes=("cls.", "lm_predictions."),
        tied=(("cls.predictions.decoder.weight", "deberta.embeddings.word_embeddings.weight"),
              ("cls.predictions.decoder.bias", "cls.predictions.bias")),
        default_student="deberta-v2", bert_shaped=False),
)}


def supported() -> str:
    return ", ".join(FAMILIES)


def family_of(model_or_config) -> Family:
    """The entry for a model or a config (by ``model_type``)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    fam = FAMILIES.get(model_type)
    if fam is None:
        raise UserError(f"teacher.name_or_path: model_type '{model_type}' is not "
                        f"supported; use one of {supported()}")
    return fam


def student_family(teacher_config, name: str = "auto") -> Family:
    """``student.family``: "auto" is the teacher family's default student; otherwise the same
    family as the teacher, or a family that can be cut from any BERT-shaped teacher."""
    t = family_of(teacher_config)
    fam = FAMILIES.get(t.default_student if name == "auto" else name)
    if fam is None:
        raise UserError(f"student.family: unknown family '{name}'; use auto or one of "
                        f"{supported()}")
    if fam is not t and not (fam.config_from and t.bert_shaped):
        cut = [f.model_type for f in FAMILIES.values() if f.config_from and t.bert_shaped]
        raise UserError(f"student.family: a '{fam.model_type}' student cannot be cut from a "
                        f"'{t.model_type}' teacher; use auto ({t.default_student})"
                        + "".join(f" or {c}" for c in cut if c != t.default_student))
    return fam


# the calls teacher preparation and evaluation make, for any supported model


def encode(model: nn.Module, input_ids, attention_mask, hidden_states: bool = False):
    return family_of(model).encode(model, input_ids, attention_mask, hidden_states)


def head_logits(model: nn.Module, rows: torch.Tensor) -> torch.Tensor:
    return family_of(model).head_logits(model, rows)


def layers(model: nn.Module) -> nn.ModuleList:
    return family_of(model).layers(model)


def embeddings(model: nn.Module) -> nn.Module:
    return family_of(model).embeddings(model)


def reset_head(model: nn.Module, counts: torch.Tensor) -> None:
    family_of(model).reset_head(model, counts)


def head_parameters(model: nn.Module) -> list:
    return family_of(model).head_parameters(model)


def max_positions(config) -> int:
    return family_of(config).max_positions(config)


def attn_for(cls, attn_implementation: str) -> str:
    """sdpa where the class has it; DeBERTa-v2's disentangled attention is eager only."""
    if attn_implementation == "eager" or getattr(cls, "_supports_sdpa", False):
        return attn_implementation
    return "eager"


def teacher_config(path: str):
    """The config of the checkpoint at ``path``, of a supported family: read alone, so that a
    run refuses an unsupported teacher, or sequences longer than its positions, before it
    reads any data."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as e:
        raise UserError(f"teacher.name_or_path: cannot load '{path}' "
                        f"({first_line(e, 160)})") from None
    fam = FAMILIES.get(config.model_type)
    if fam is None:
        raise UserError(f"teacher.name_or_path: '{path}' is a '{config.model_type}' model; "
                        f"the teacher must be a masked LM of one of: {supported()}")
    return config


def load_mlm(path: str, attn_implementation: str = "eager"):
    """Any supported checkpoint as its stock ``*ForMaskedLM``; returns (model, head_missing).

    A checkpoint saved without the MLM head (a sentence encoder, an ELECTRA discriminator)
    loads with a random head, reported as ``head_missing`` for the caller to deal with."""
    from transformers import AutoModelForMaskedLM
    from transformers.utils import logging as hf_logging

    fam = family_of(teacher_config(path))
    # the missing-head report is ours to make (load_teacher says what it does about it)
    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            path, output_loading_info=True,
            attn_implementation=attn_for(fam.cls(), attn_implementation))
    except (SafetensorError, OSError, EOFError, RuntimeError) as e:  # truncated, garbled
        raise UserError(f"teacher.name_or_path: cannot read the weights in '{path}' "
                        f"({first_line(e, 160)}); the file is damaged or incomplete: save or "
                        "download it again") from None
    finally:
        hf_logging.set_verbosity(old)
    return model, fam.head_missing(info.get("missing_keys", []))
