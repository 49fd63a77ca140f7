"""Tokenizers: built-in word/byte round trip, padding/eos layout, HF tokenizer.json and SentencePiece files."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aimv2.data import get_tokenizer, normalize_caption
from aimv2.data.synth import render_sample
from aimv2.data.tokenizer import WordByteTokenizer


def test_normalize_caption():
    assert normalize_caption("  A\tRed\n\nCircle  ") == "a red circle"
    with pytest.raises(TypeError, match="caption"):
        normalize_caption(b"bytes")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=60))
def test_builtin_round_trips_any_text(text):
    tok = get_tokenizer()
    ids = tok.encode(text)
    assert all(3 <= i < tok.vocab_size for i in ids)  # never pad / eos / unk inside a caption
    assert tok.decode(ids) == normalize_caption(text)


def test_builtin_vocab_fits_tiny_model_and_covers_synthetic_captions():
    tok = get_tokenizer()
    assert tok.vocab_size <= 1024 and tok.pad_id == 0 and tok.eos_id == 1
    for i in range(40):
        _, caption, _ = render_sample(i, 32, seed=0)
        ids = tok.encode(caption)
        assert len(ids) == len(caption.split()), caption  # one id per word: no byte fallback needed
        assert all(i >= 3 + 256 for i in ids)
    assert len(tok.encode("xylophoneq")) == 11  # unknown word: a space byte and 10 letter bytes


def test_batch_call_pads_truncates_and_appends_eos():
    tok = get_tokenizer(text_len=12)
    out = tok(["A red circle", "word " * 30, ""])
    assert out.shape == (3, 12) and out.dtype == torch.int64
    n = len(tok.encode("a red circle"))
    assert out[0, n] == tok.eos_id and (out[0, n + 1:] == tok.pad_id).all()
    assert out[1, -1] == tok.eos_id and (out[1, :-1] != tok.pad_id).all()  # truncated to 11 + eos
    assert out[2, 0] == tok.eos_id and (out[2, 1:] == tok.pad_id).all()
    assert tok.decode(out[0]) == "a red circle"
    assert get_tokenizer()(["x"]).shape == (1, 77)
    with pytest.raises(TypeError, match="list of str"):
        tok("a single string")


def test_bad_specs_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        get_tokenizer(str(tmp_path / "nope.json"))
    (tmp_path / "vocab.txt").write_text("x")
    with pytest.raises(ValueError, match="vocab.txt"):
        get_tokenizer(str(tmp_path / "vocab.txt"))
    with pytest.raises(ValueError, match="1024"):
        WordByteTokenizer(words=[f"w{i}" for i in range(800)])


CORPUS = [render_sample(i, 32, seed=1)[1] for i in range(200)]


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    t = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "</s>"]))
    path = str(tmp_path / "tokenizer.json")
    t.save(path)
    tok = get_tokenizer(path)
    assert tok.pad_id == 0 and tok.eos_id == 2 and tok.vocab_size == t.get_vocab_size()
    out = tok(CORPUS[:4], text_len=32)
    for row, cap in zip(out, CORPUS[:4]):
        assert tok.decode(row) == normalize_caption(cap)
        n = len(cap.split())
        assert row[n] == tok.eos_id and (row[n + 1:] == 0).all()


def test_sentencepiece_model(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    prefix = str(tmp_path / "sp")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS), model_prefix=prefix, vocab_size=60,
                                   pad_id=3, model_type="unigram", minloglevel=2)
    tok = get_tokenizer(prefix + ".model")
    assert tok.vocab_size == 60 and tok.pad_id == 3 and tok.eos_id == 2
    out = tok(CORPUS[:3])
    for row, cap in zip(out, CORPUS[:3]):
        assert tok.decode(row) == normalize_caption(cap)
        assert (row[row.tolist().index(tok.eos_id) + 1:] == tok.pad_id).all()


def test_loader_uses_tokenizer_from_config(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    import numpy as np

    from aimv2.data import DataConfig, build_loader
    from aimv2.data.testing import good_sample, write_shard
    from tokenizers import models, pre_tokenizers, trainers

    rng = np.random.default_rng(0)
    samples = [good_sample(f"k{i}", rng) for i in range(4)]
    shard = write_shard(str(tmp_path / "t.tar"), samples)
    t = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.train_from_iterator([s["txt"].decode().lower() for s in samples],
                          trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "</s>"]))
    t.save(str(tmp_path / "tok.json"))
    loader = build_loader(DataConfig(shards=shard, image_size=28, batch_size=4, backend="torch", num_workers=0,
                                     tokenizer=str(tmp_path / "tok.json"), text_len=12, train=False, return_keys=True))
    assert loader.tokenizer.vocab_size == t.get_vocab_size()
    (b,) = list(loader)
    assert b["text"].shape == (4, 12)
    for row, key in zip(b["text"], b["keys"]):
        assert loader.tokenizer.decode(row) == normalize_caption(f"sample {key.split(':')[1]} with a caption")
