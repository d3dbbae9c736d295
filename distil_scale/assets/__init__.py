"""Files shipped inside the package, so that checks at random-weight shapes need no model
package and no hub: bert-base-uncased's 30,522-token WordPiece vocabulary (the one
all-MiniLM-L6-v2 uses too) with its tokenizer settings, 0.2 MB."""
from pathlib import Path

BERT_UNCASED = str(Path(__file__).resolve().parent / "bert-base-uncased")
