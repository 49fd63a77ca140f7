"""Content-word readout: does the multimodal decoder read the caption off the image?

For each validation caption t_1..t_T (teacher forcing), the decoder's arg-max prediction of token t_k is
compared with t_k at the positions where t_k is a *content word* of the embedded dataset (shape kind,
colour, size, position, texture / pattern; `aimv2.data.synth` vocabulary). It is read twice:

    true      decoder([proj(enc(image_b)) | CLS | t_b])             the sample's own image
    shuffled  decoder([proj(enc(image_{b-1 mod B})) | CLS | t_b])   another sample's image (a roll of the
                                                                    batch: no sample keeps its own image)

accuracy = 100 * correct / counted over the content-word positions of the whole split. The words before
t_k (the caption so far) are the same in both reads, so `true - shuffled` is what the decoder gets from
the image: a language prior alone scores the same on both, a decoder that ignores the encoder shows no
gap. The encoder runs with the data's prefix lengths (`DataConfig.prefix`, by default the training
distribution P ~ U{1..N-1}, seeded), i.e. the decoder is read as it was trained.

Equivalent PyTorch per batch: logits = model.text_logits(model.decoder(model.encoder(x, P), t)[1]); hit = logits.argmax(-1) == t
on the mask `isin(t, content ids)`; shuffled: enc.roll(1, 0).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn as nn

from aimv2 import kernels as K

__all__ = ["CONTENT_WORDS", "content_word_ids", "content_word_accuracy", "run_readout", "load_pretrainer",
           "random_pretrainer_like"]


def _content_words() -> dict[str, tuple[str, ...]]:
    from aimv2.data.synth import BACKGROUNDS, COLOURS, KINDS, PATTERNS, SIZES, TEXTURES
    textures = tuple(dict.fromkeys(w for w in (*TEXTURES, *PATTERNS) if w not in ("solid", "plain")))
    return {
        "kind": tuple(KINDS),
        "colour": (*COLOURS, *BACKGROUNDS),
        "size": tuple(SIZES),
        "position": ("above", "below", "left", "right"),
        "texture": textures,
    }


CONTENT_WORDS: dict[str, tuple[str, ...]] = _content_words()


def content_word_ids(tokenizer, categories: Mapping[str, Sequence[str]] = CONTENT_WORDS) -> dict[str, list[int]]:
    """{category: token ids} of each word as it appears inside a caption (" red"); a word the tokenizer
    splits into several tokens raises (its first piece would not identify it)."""
    out = {}
    for cat, words in categories.items():
        ids = []
        for w in words:
            enc = tokenizer.encode("a " + w)[1:] if hasattr(tokenizer, "encode") else None
            if enc is None or len(enc) != 1:
                raise ValueError(f"tokenizer: content word {w!r} ({cat}) is not one token ({enc!r}); "
                                 f"the readout needs single-token content words")
            ids.append(int(enc[0]))
        out[cat] = ids
    return out


@torch.no_grad()
def content_word_accuracy(model: nn.Module, batches: Iterable[dict], word_ids: Mapping[str, Sequence[int]],
                          *, max_batches: int | None = None) -> dict:
    """Teacher-forced next-token accuracy on content words, true image vs the batch rolled by one.

    model: an `AIMv2Pretrainer` (encoder + decoder). batches: dicts with images (B, 3, S, S), text (B, T),
    prefix_len (B,) as the aimv2.data loader yields them; a batch of one sample has no other image and is
    skipped. Returns dict(true, shuffled, gap (percentage points), words (counted positions),
    per_category {cat: {"true", "shuffled", "words"}}, next_patch_error, same_patch_error): the last two
    score the pixel head (true image) against patch i+1 and against patch i; a decoder trained on method.md §4's
    shifted target is closer to i+1, one trained without the shift (a copy task) is closer to i.
    """
    p = next(model.parameters())
    model.eval()
    cats = list(word_ids)
    id_sets = [torch.tensor(sorted(set(word_ids[c])), dtype=torch.long, device=p.device) for c in cats]
    counts = torch.zeros(len(cats), 3, dtype=torch.float64)         # (categories, [true hits, shuffled hits, words])
    pix = torch.zeros(3, dtype=torch.float64)                      # [error vs patch i+1, vs patch i, pairs]
    for i, batch in enumerate(batches):
        if max_batches is not None and i >= max_batches:
            break
        images = batch["images"].to(p.device, p.dtype)
        text = batch["text"].to(p.device)                           # (B, T)
        if images.shape[0] < 2:
            continue
        plen = batch["prefix_len"].to(p.device)
        enc = model.encoder(images, plen)                           # (B, N, D)
        hits = []
        for e in (enc, enc.roll(1, dims=0)):                        # own image, the previous sample's image
            pixels, hidden = model.decoder(e, text)                 # (B, N, p*p*C), (B, T, Dd)
            logits = model.text_logits(hidden)                      # (B, T, V); [:, k] predicts text[:, k]
            hits.append(logits.argmax(-1) == text)                  # (B, T)
            if len(hits) == 1:
                pix += _next_vs_same(pixels.float(), images, plen, model.cfg)
        for c, ids in enumerate(id_sets):
            mask = torch.isin(text, ids)                            # (B, T)
            counts[c, 0] += float((hits[0] & mask).sum())
            counts[c, 1] += float((hits[1] & mask).sum())
            counts[c, 2] += float(mask.sum())

    def pct(hit, n):
        return float(100.0 * hit / n) if n > 0 else float("nan")

    tot = counts.sum(0)
    if tot[2] == 0:
        raise ValueError("batches: no content word found in the captions (another dataset or tokenizer?)")
    per = {c: {"true": pct(counts[k, 0], counts[k, 2]), "shuffled": pct(counts[k, 1], counts[k, 2]),
               "words": int(counts[k, 2])} for k, c in enumerate(cats)}
    true, shuf = pct(tot[0], tot[2]), pct(tot[1], tot[2])
    return {"true": true, "shuffled": shuf, "gap": true - shuf, "words": int(tot[2]), "per_category": per,
            "next_patch_error": float(pix[0] / pix[2]), "same_patch_error": float(pix[1] / pix[2])}


def _next_vs_same(pixels: torch.Tensor, images: torch.Tensor, plen: torch.Tensor, cfg) -> torch.Tensor:
    """[sum of errors of pixel output i against patch i+1 (what it is trained to predict), sum against
    patch i (its own input patch), pairs], over the pairs whose patch i+1 is not in the prefix. Targets are
    method.md §4's normalised patches; error = mean squared difference over the patch's values."""
    t = K.patchify(images.float(), cfg.patch_size)                                         # (B, N, K)
    t = (t - t.mean(-1, keepdim=True)) / torch.sqrt(t.var(-1, keepdim=True) + cfg.patch_norm_eps)
    N = t.shape[1]
    counted = (torch.arange(1, N, device=t.device)[None] >= plen.view(-1, 1)).double()    # (B, N-1)
    nxt = (pixels[:, :-1] - t[:, 1:]).pow(2).mean(-1).double()                             # (B, N-1)
    same = (pixels[:, :-1] - t[:, :-1]).pow(2).mean(-1).double()
    return torch.stack([(nxt * counted).sum(), (same * counted).sum(), counted.sum()]).cpu()


def run_readout(model: nn.Module, val_shards, *, batch_size: int = 64, num_workers: int = 2,
                tokenizer=None, max_batches: int | None = None) -> dict:
    """content_word_accuracy of `model` over the validation shards (one pass in shard order, eval crop,
    the data's seeded training prefix lengths)."""
    from aimv2.data import DataConfig, build_loader

    cfg = model.cfg
    loader = build_loader(DataConfig(
        shards=val_shards, image_size=cfg.img_size, patch_size=cfg.patch_size, batch_size=batch_size,
        num_workers=num_workers, train=False, text_len=cfg.text_len, tokenizer=tokenizer,
        device=str(next(model.parameters()).device)))
    return content_word_accuracy(model, loader, content_word_ids(loader.tokenizer), max_batches=max_batches)


def load_pretrainer(source, device=None) -> nn.Module:
    """The whole `AIMv2Pretrainer` (encoder and decoder) of a training run dir (newest whole checkpoint)
    or checkpoint dir, eval mode, fp32, on `device` (default CPU)."""
    from pathlib import Path

    from aimv2.config import ModelConfig
    from aimv2.model import AIMv2Pretrainer
    from aimv2.train.checkpoint import latest_checkpoint, load_checkpoint

    path = Path(source)
    ckpt = latest_checkpoint(path) if (path / "checkpoints").is_dir() else path
    if ckpt is None:
        raise ValueError(f"source: no whole checkpoint under {str(path / 'checkpoints')!r}")
    sd, cfg, _ = load_checkpoint(ckpt)
    model = AIMv2Pretrainer(ModelConfig.from_dict(cfg))
    model.load_state_dict(sd)
    return model.to(device or "cpu", torch.float32).eval()


def random_pretrainer_like(model: nn.Module, seed: int = 0) -> nn.Module:
    """A fresh `AIMv2Pretrainer` of model's config (method.md §1 init, seed `seed`), same device and dtype, eval mode:
    the random-init baseline of the readout."""
    from aimv2.model import AIMv2Pretrainer

    p = next(model.parameters())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        rnd = AIMv2Pretrainer(model.cfg)
    return rnd.to(p.device, p.dtype).eval()
