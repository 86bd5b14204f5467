"""The tokenizer behind the Mixtral v1 instruct encoding: plain text segments -> ids, in batches.

The default is the Mixtral 8x7B SentencePiece model that ships inside mistral-common (the same
file as the hub's ``tokenizer.model``, see shared/FORMATS.md section 1). A directory with a
``tokenizer.json`` only is read with the ``tokenizers`` library, special tokens split as text
(``encode_special_tokens``) so that a literal "</s>" in a message stays text, as in SentencePiece.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep.sources import file_hash


def default_tokenizer_path() -> Path:
    """``mistral_common/data/tokenizer.model.v1`` in the installed mistral-common."""
    import mistral_common

    path = Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing: the installed mistral-common does not ship the v1 tokenizer; "
            "set data.tokenizer to a tokenizer.model file"
        )
    return path


@dataclass
class Tokenizer:
    """Batched text -> ids with the BOS/EOS ids the instruct format needs."""

    path: Path
    kind: str  # "sentencepiece" or "tokenizers"
    bos_id: int
    eos_id: int
    vocab_size: int
    sha256: str
    _backend: Any = field(repr=False)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Ids of each text, no BOS/EOS, each text encoded on its own (with its own dummy prefix)."""
        if not texts:
            return []
        if self.kind == "sentencepiece":
            return self._backend.encode(texts, out_type=int)
        return [e.ids for e in self._backend.encode_batch_fast(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids)

    # Worker processes rebuild the backend from the path instead of pickling a C++ object.
    def __getstate__(self):
        state = dict(self.__dict__)
        state["_backend"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._backend = _open_backend(self.path, self.kind)


def _open_backend(path: Path, kind: str):
    if kind == "sentencepiece":
        import sentencepiece

        return sentencepiece.SentencePieceProcessor(model_file=str(path))
    from tokenizers import Tokenizer as HFTokenizer

    backend = HFTokenizer.from_file(str(path))
    backend.encode_special_tokens = True
    return backend


def load_tokenizer(path: str | os.PathLike | None = None) -> Tokenizer:
    """Open the tokenizer: None = Mixtral's (mistral-common v1), a ``tokenizer.model`` file, or an
    HF tokenizer directory (its ``tokenizer.model`` is preferred: SentencePiece is the reference)."""
    path = default_tokenizer_path() if path is None else Path(path)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            path = path / "tokenizer.model"
        elif (path / "tokenizer.json").is_file():
            path = path / "tokenizer.json"
        else:
            raise FileNotFoundError(f"data.tokenizer: {path} holds neither tokenizer.model nor tokenizer.json")
    if not path.is_file():
        raise FileNotFoundError(f"data.tokenizer: {path} does not exist (give a tokenizer.model file or an HF tokenizer dir)")
    kind = "tokenizers" if path.suffix == ".json" else "sentencepiece"
    try:
        backend = _open_backend(path, kind)
    except Exception as err:  # sentencepiece raises RuntimeError/OSError, tokenizers its own Exception
        raise ValueError(f"data.tokenizer: cannot read {path} as a {kind} tokenizer: {err}") from err
    if kind == "sentencepiece":
        bos, eos, vocab = backend.bos_id(), backend.eos_id(), backend.get_piece_size()
    else:
        bos, eos = _hf_special_ids(path, backend)
        vocab = backend.get_vocab_size()
    if bos < 0 or eos < 0:
        raise ValueError(f"data.tokenizer: {path} defines no BOS/EOS ids; the instruct format needs both")
    return Tokenizer(path=path, kind=kind, bos_id=bos, eos_id=eos, vocab_size=vocab, sha256=file_hash(path), _backend=backend)


def _hf_special_ids(path: Path, backend) -> tuple[int, int]:
    names = {"bos_token": "<s>", "eos_token": "</s>"}
    config = path.parent / "tokenizer_config.json"
    if config.is_file():
        data = json.loads(config.read_text())
        for key in names:
            value = data.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names[key] = value
    ids = [backend.token_to_id(names[k]) for k in ("bos_token", "eos_token")]
    return tuple(-1 if i is None else i for i in ids)
