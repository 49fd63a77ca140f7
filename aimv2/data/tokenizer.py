"""Caption tokenizers: a built-in word-level vocabulary with byte fallback, or a local HF / SentencePiece file.

Every tokenizer maps a batch of captions to a LongTensor (B, text_len) of ids, right-padded with
`pad_id`. Captions are first normalised (`normalize_caption`): lower-cased, whitespace collapsed to
single spaces, stripped. Each encoded caption ends with `eos_id` (truncated to text_len - 1 tokens
first), matching method.md §4 where the text loss ignores `pad_id` only.

Built-in tokenizer (`WordByteTokenizer`, no download, vocab_size <= 1024):
  ids 0 <pad>, 1 <eos>, 2 <unk> (never emitted), 3..258 the 256 bytes, 259.. whole-word pieces.
  The normalised caption t is split into pieces by the regex ` ?\\w+| ?[^\\w\\s]+` applied to " " + t,
  so that "".join(pieces) == " " + t exactly. A piece found in the vocabulary (e.g. " red", ",")
  becomes one id; any other piece becomes its UTF-8 bytes. decode(encode(t)) == normalize(t) for
  every string t (the leading space is stripped), so unknown words and non-English text round-trip.

Equivalent HF usage: tokenizers.Tokenizer.from_file(path).encode(normalize(t)).ids + [eos].
"""
from __future__ import annotations

import os
import re
from typing import Iterable, Sequence

import torch

__all__ = ["normalize_caption", "get_tokenizer", "WordByteTokenizer", "HFTokenizer", "SentencePieceTokenizer"]

_WS = re.compile(r"\s+")
_PIECE = re.compile(r" ?\w+| ?[^\w\s]+")

# Words of the synthetic dataset (aimv2.data.synth) first, then common caption English.
_SYNTH_WORDS = """
a an the of on in and with to it is at left right above below next beside near small medium large
tiny big red orange yellow green cyan blue purple pink white gray grey black beige brown navy
circle square triangle star hexagon cross diamond pentagon shape shapes solid striped dotted
checkered plain gradient background photo picture image scene there are one two three
""".split()

_COMMON_WORDS = """
about after again against all also am another any around as away back bad be because been before
being between both but by can could day did do does down each even every few for from get go good
great had has have he her here him his how i if into its just like little long look made make many
me more most much my new no not now off old only or other our out over own part people same see she
should so some still such than that their them then these they this those through time too under up
us use very was way we well were what when where which while who why will would you your
man woman men women person child children boy girl baby people group crowd family friend player
dog cat bird horse cow sheep bear elephant giraffe zebra animal fish duck chicken pet puppy kitten
car bus truck train plane airplane boat ship bike bicycle motorcycle road street sign light traffic
house building city town window door wall roof room kitchen table chair bed couch sofa desk floor
tree trees grass field flower flowers plant plants garden park forest mountain mountains hill river
lake sea ocean beach water sand snow sky cloud clouds sun rain ice rock rocks stone wood
food pizza cake sandwich plate bowl cup glass bottle fruit apple banana orange vegetables bread
phone computer laptop screen book books paper bag box ball toy clock umbrella kite frisbee
shirt dress hat jacket coat shoes glasses hair face hand hands eyes head body arm legs
sitting standing walking running playing holding riding eating looking wearing lying flying
parked driving carrying sleeping smiling jumping swimming watching talking taking posing
front top bottom side middle center corner edge inside outside behind under over across along
close up view shot top down closeup background foreground colorful bright dark light old new
wooden metal white black empty full open closed several many some various different other
young little tall short long wide round square flat high low large huge pair couple lot
""".split()


def normalize_caption(text: str) -> str:
    """Lower-case, collapse every run of whitespace to one space, strip. `str -> str`."""
    if not isinstance(text, str):
        raise TypeError(f"caption: expected str, got {type(text).__name__}")
    return _WS.sub(" ", text.lower()).strip()


class _Base:
    """Shared batch call: captions -> (B, text_len) int64, eos appended, right-padded with pad_id."""

    vocab_size: int
    pad_id: int
    eos_id: int | None
    text_len: int

    def encode(self, text: str) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, texts: Sequence[str], text_len: int | None = None) -> torch.Tensor:
        if isinstance(texts, str):
            raise TypeError("texts: expected a list of str, got a single str (wrap it in a list)")
        L = self.text_len if text_len is None else int(text_len)
        if L < 2:
            raise ValueError(f"text_len: expected >= 2, got {L}")
        out = torch.full((len(texts), L), self.pad_id, dtype=torch.int64)  # (B, L)
        for b, t in enumerate(texts):
            ids = self.encode(t)
            if self.eos_id is not None:
                ids = ids[: L - 1] + [self.eos_id]
            else:
                ids = ids[:L]
            out[b, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out

    def _strip_special(self, ids: Iterable[int]) -> list[int]:
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        out = []
        for i in ids:
            if i == self.eos_id:
                break
            if i != self.pad_id:
                out.append(i)
        return out


class WordByteTokenizer(_Base):
    """Built-in tokenizer: word pieces for common caption words, UTF-8 byte fallback for the rest."""

    PAD, EOS, UNK, BYTE0 = 0, 1, 2, 3

    def __init__(self, words: Sequence[str] | None = None, text_len: int = 77):
        if words is None:
            words = list(dict.fromkeys(_SYNTH_WORDS + _COMMON_WORDS))
        pieces = [" " + w for w in words] + [",", ".", "'", "-", "!", "?", ":", ";", '"', "(", ")"]
        self._pieces = list(dict.fromkeys(pieces))
        self._piece_id = {p: self.BYTE0 + 256 + i for i, p in enumerate(self._pieces)}
        self.vocab_size = self.BYTE0 + 256 + len(self._pieces)
        if self.vocab_size > 1024:
            raise ValueError(f"words: built-in vocabulary must fit 1024 ids, got {self.vocab_size}")
        self.pad_id, self.eos_id, self.text_len = self.PAD, self.EOS, text_len
        self.name = "builtin-wordbyte"

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece in _PIECE.findall(" " + normalize_caption(text)):
            pid = self._piece_id.get(piece)
            if pid is not None:
                ids.append(pid)
            else:
                ids.extend(self.BYTE0 + b for b in piece.encode("utf-8"))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        buf = bytearray()
        for i in self._strip_special(ids):
            if self.BYTE0 <= i < self.BYTE0 + 256:
                buf.append(i - self.BYTE0)
            elif self.BYTE0 + 256 <= i < self.vocab_size:
                buf.extend(self._pieces[i - self.BYTE0 - 256].encode("utf-8"))
            else:
                raise ValueError(f"ids: token id {i} outside the vocabulary [0, {self.vocab_size})")
        text = buf.decode("utf-8", errors="replace")
        return text[1:] if text.startswith(" ") else text


class HFTokenizer(_Base):
    """A local Hugging Face `tokenizer.json` loaded with the `tokenizers` package."""

    def __init__(self, path: str, text_len: int = 77):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"tokenizer={path!r} is a Hugging Face tokenizer.json: `pip install tokenizers` to use it"
            ) from e
        self._tok = Tokenizer.from_file(path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        tid = self._tok.token_to_id
        eos_names = ("</s>", "<eos>", "<|endoftext|>", "[SEP]", "<|eos|>")
        self.eos_id = next((tid(t) for t in eos_names if tid(t) is not None), None)
        pad = next((tid(t) for t in ("<pad>", "[PAD]", "<|pad|>") if tid(t) is not None), None)
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)
        self.text_len, self.name = text_len, path

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(normalize_caption(text), add_special_tokens=False).ids)

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(self._strip_special(ids), skip_special_tokens=True)


class SentencePieceTokenizer(_Base):
    """A local SentencePiece `.model` (e.g. SigLIP's, V = 32000, pad = eos = 1) via `sentencepiece`."""

    def __init__(self, path: str, text_len: int = 77):
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"tokenizer={path!r} is a SentencePiece model: `pip install sentencepiece` to use it"
            ) from e
        self._sp = spm.SentencePieceProcessor(model_file=path)
        self.vocab_size = int(self._sp.get_piece_size())
        eos = int(self._sp.eos_id())
        self.eos_id = eos if eos >= 0 else None
        pad = int(self._sp.pad_id())
        self.pad_id = pad if pad >= 0 else (self.eos_id if self.eos_id is not None else 0)
        self.text_len, self.name = text_len, path

    def encode(self, text: str) -> list[int]:
        return list(self._sp.encode(normalize_caption(text)))

    def decode(self, ids: Iterable[int]) -> str:
        return self._sp.decode(self._strip_special(ids))


def get_tokenizer(spec=None, text_len: int = 77):
    """`None` -> built-in; a path to `tokenizer.json` -> HFTokenizer; `*.model` -> SentencePieceTokenizer.

    An object that already has `encode`, `decode`, `pad_id` and `vocab_size` is returned as is.
    """
    if spec is None or spec == "builtin":
        return WordByteTokenizer(text_len=text_len)
    if all(hasattr(spec, a) for a in ("encode", "decode", "pad_id", "vocab_size")):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer: expected None, a path or a tokenizer object, got {type(spec).__name__}")
    path = os.fspath(spec)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer: no such file {path!r} (expected tokenizer.json or a SentencePiece .model)")
    kinds = {".json": (HFTokenizer, "Hugging Face tokenizer.json"),
             ".model": (SentencePieceTokenizer, "SentencePiece model")}
    for ext, (cls, what) in kinds.items():
        if path.endswith(ext):
            try:
                return cls(path, text_len)
            except ImportError:
                raise
            except Exception as e:   # the libraries raise bare Exception / RuntimeError naming no file
                raise ValueError(f"tokenizer: {path!r} is not a valid {what} ({' '.join(str(e).split())})") from e
    raise ValueError(f"tokenizer: {path!r} is neither a .json (Hugging Face) nor a .model (SentencePiece) file")
