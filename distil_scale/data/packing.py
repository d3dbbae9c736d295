"""Pack a stream of tokenized documents into full [CLS] ... [SEP] sequences of max_seq_len.

Documents are concatenated with [SEP] between them and cut into chunks of max_seq_len - 2, so
no document is truncated to its first chunk and no sequence carries padding.
"""
from __future__ import annotations


class Packer:
    def __init__(self, max_seq_len: int, cls_id: int, sep_id: int):
        self.body = max_seq_len - 2
        self.cls_id, self.sep_id = cls_id, sep_id
        self.buffer: list[int] = []

    def add(self, doc_ids: list[int]) -> list[list[int]]:
        """Append one document; return the complete sequences it finished."""
        if not doc_ids:
            return []
        if self.buffer:
            self.buffer.append(self.sep_id)
        self.buffer.extend(doc_ids)
        out = []
        while len(self.buffer) >= self.body:
            chunk, self.buffer = self.buffer[:self.body], self.buffer[self.body:]
            if self.buffer and self.buffer[0] == self.sep_id:
                self.buffer = self.buffer[1:]  # a boundary [SEP] would duplicate the final one
            out.append([self.cls_id, *chunk, self.sep_id])
        return out

    def state_dict(self) -> dict:
        return {"buffer": list(self.buffer)}

    def load_state_dict(self, sd: dict) -> None:
        self.buffer = list(sd["buffer"])
