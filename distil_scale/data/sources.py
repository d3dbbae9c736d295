"""Text sources: a hub dataset streamed with ``streaming=True``, or local txt/jsonl/parquet files
read through the same datasets streaming builders, so resume uses one state_dict either way.

Ranks get disjoint sets of whole shards (files, or parquet row groups) whenever there are at
least as many shards as ranks, so no rank downloads the corpus to keep one row in ``world``;
only a corpus of fewer shards than ranks is split row by row. The order of the shards is
shuffled by seed; rows within a shard keep their order, and the shuffle buffer that mixes them
is ours (stream.py), because datasets' buffer is not part of its state_dict.
"""
from __future__ import annotations

import glob
import logging
import os
import random
import zlib
from pathlib import Path

from ..errors import UserError, first_line

_BUILDERS = {".txt": "text", ".text": "text", ".jsonl": "json", ".json": "json",
             ".parquet": "parquet"}


def resolve_source(source: str) -> str:
    """``pypi:PKG/sub`` -> a directory shipped inside a package; anything else passes through."""
    if source.startswith("pypi:"):
        pkg, _, sub = source[5:].partition("/")
        try:
            mod = __import__(pkg)
        except ImportError:
            raise UserError(f"data.source: package '{pkg}' is not installed; "
                            f"pip install {pkg} (or pip install -e .[demo])") from None
        root = Path(mod.__file__).parent
        path = root / sub / "data" if (root / sub / "data").is_dir() else root / sub
        if not path.is_dir():
            raise UserError(f"data.source: '{source}' has no folder '{sub}' in {root}")
        return str(path)
    return source


def _local_files(path: Path) -> list[str]:
    if path.is_file():
        return [str(path)]
    files = sorted(f for f in glob.glob(str(path / "**" / "*"), recursive=True)
                   if Path(f).suffix in _BUILDERS and Path(f).is_file())
    return files


def is_local(source: str) -> bool:
    s = resolve_source(source)
    return os.path.exists(s) or s.startswith((".", "/", "~"))


def open_stream(source: str, *, config_name: str = "", split: str = "train",
                text_field: str = "text", seed: int = 0, rank: int = 0, world: int = 1,
                encoding_errors: str = "strict"):
    """A datasets IterableDataset of {text_field: str} rows, sharded for ``rank`` of ``world``."""
    from datasets import load_dataset

    src = resolve_source(source)
    if is_local(src):
        path = Path(src).expanduser()
        if not path.exists():
            raise UserError(f"data.source: no such file or directory '{source}'")
        files = _local_files(path)
        if not files:
            raise UserError(f"data.source: no .txt/.jsonl/.json/.parquet files under '{source}'")
        kinds = {_BUILDERS[Path(f).suffix] for f in files}
        if len(kinds) > 1:
            raise UserError(f"data.source: '{source}' mixes file types {sorted(kinds)}; "
                            "point it at one kind")
        builder = kinds.pop()
        # Files are the shards; a seeded shuffle of their order stops a sorted corpus (BBC's
        # business/ then entertainment/ ...) from feeding one topic at a time.
        random.Random(seed).shuffle(files)
        kwargs = {}
        if builder == "text":
            # one document per file when there are many files; paragraphs of a single file
            kwargs["sample_by"] = "document" if len(files) > 1 else "paragraph"
            kwargs["encoding_errors"] = encoding_errors
        ds = load_dataset(builder, data_files=files, split="train", streaming=True, **kwargs)
    else:
        try:
            ds = load_dataset(src, config_name or None, split=split, streaming=True)
        except Exception as e:  # the hub raises many types; all mean "cannot open this source"
            raise UserError(f"data.source: cannot stream '{src}' ({first_line(e)}); offline, point "
                            "data.source at a local txt/jsonl/parquet file or folder") from None
        ds = shuffle_shards(ds, seed)
    return shard_for_rank(ds, rank, world)


def shuffle_shards(ds, seed: int):
    """The shards in a seeded order, rows within each in theirs. A shuffle buffer of one row
    shuffles only the shard order and holds nothing between rows, so datasets' state_dict
    stays exact; one input shard at a time keeps the rows of different shards apart."""
    _quiet_empty_buffer_warning()
    return ds.shuffle(seed=seed, buffer_size=1, max_buffer_input_shards=1)


def shard_for_rank(ds, rank: int, world: int):
    """Whole shards per rank when there are enough of them (disjoint for the whole run: the
    per-epoch reshuffle of datasets then permutes a rank's own shards only); else every
    world-th row."""
    from datasets.distributed import split_dataset_by_node

    if world <= 1:
        return ds
    if ds.num_shards < world and hasattr(ds, "reshard"):
        ds = ds.reshard()  # parquet: one shard per row group
    if ds.num_shards >= world:
        return ds.shard(num_shards=world, index=rank, contiguous=False)
    return split_dataset_by_node(ds, rank=rank, world_size=world)


class _DropEmptyBufferWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "shuffle buffer of a dataset without the buffer content" not in record.getMessage()


def _quiet_empty_buffer_warning() -> None:
    # datasets warns on every load_state_dict of a shuffled stream that the buffer was not
    # saved; with a one-row buffer there is nothing in it between rows
    lg = logging.getLogger("datasets.iterable_dataset")
    if not any(isinstance(f, _DropEmptyBufferWarning) for f in lg.filters):
        lg.addFilter(_DropEmptyBufferWarning())


def is_heldout(text: str, fraction: float) -> bool:
    """Deterministic document-level split that needs no index: the same on every rank and
    in every epoch, for a stream whose length is unknown."""
    h = zlib.crc32(text[:2000].encode("utf-8", "replace"))
    return h / 2**32 < fraction


def open_from_config(data_cfg, *, seed: int = 0, rank: int = 0, world: int = 1):
    return open_stream(data_cfg.source, config_name=data_cfg.config_name, split=data_cfg.split,
                       text_field=data_cfg.text_field, seed=seed, rank=rank, world=world,
                       encoding_errors=data_cfg.encoding_errors)


def iter_texts(ds, data_cfg):
    """Texts of a stream's rows, with a bad encoding or a missing field as a one-line error."""
    it = iter(ds)
    while True:
        try:
            row = next(it)
        except StopIteration:
            return
        except UnicodeDecodeError as e:
            raise UserError(f"data.source: a file under '{data_cfg.source}' is not valid UTF-8 "
                            f"({e.reason} at byte {e.start}); re-encode it as UTF-8 or set "
                            "data.encoding_errors=replace") from None
        text = row.get(data_cfg.text_field)
        if data_cfg.text_field not in row:
            raise UserError(f"data.text_field: rows of '{data_cfg.source}' have no field "
                            f"'{data_cfg.text_field}' (fields: {', '.join(row)})")
        if not isinstance(text, str):
            # the field exists (a jsonl row without it reads as null): the row is the problem
            raise UserError(f"data.source: a row of '{data_cfg.source}' has "
                            f"{data_cfg.text_field}={text!r:.40}, not text; fix or drop that row "
                            "(a run that stopped on it continues with --resume)")
        yield text


def source_fingerprint(source: str) -> list:
    """What identifies a source's content cheaply: each local file's path, size and mtime (a
    corpus edited in place gets a new fingerprint), or the hub id as given."""
    src = resolve_source(source)
    if not is_local(src):
        return [src]
    path = Path(src).expanduser()
    if not path.exists():
        return [src]
    out = []
    for f in _local_files(path):
        st = os.stat(f)
        out.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return out
