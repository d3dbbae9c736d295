"""Files shipped inside the package, so that checks at random-weight shapes need no model
package and no hub: bert-base-uncased's 30,522-token WordPiece vocabulary (the one
all-MiniLM-L6-v2 uses too) with its tokenizer settings, 0.2 MB. And where the shipped run
configs are."""
from pathlib import Path

BERT_UNCASED = str(Path(__file__).resolve().parent / "bert-base-uncased")


def _configs_dir() -> Path:
    """The run configs (demo, paper, glue/): a wheel carries the repository's configs/ inside
    the package (pyproject maps it to ``distil_scale.configs``); a checkout, or an editable
    install of one, has it at the repository root, where the docs name it."""
    package = Path(__file__).resolve().parents[1]
    for d in (package / "configs", package.parent / "configs"):
        if d.is_dir():
            return d
    return package / "configs"


CONFIGS = _configs_dir()
