"""`data.source: random`: a deterministic stream of random batches with the aimv2.data loader interface
(RandomBatches; with data.native, RandomPackedBatches: packs of images of random sizes, method.md §8).

Sample k of the global stream is generated from its own generator seeded with (seed, k) alone, so
the stream does not depend on how it is split: per micro-step the world consumes W * B samples and
rank r takes [r * B, (r + 1) * B) of them. One rank with 2 accumulation micro-batches of B and two
ranks with B each see exactly the same samples in the same grouping, which is what the
DDP / FSDP parity tests need. Also useful to measure pure model throughput with no input pipeline.

    images     float32 (B, 3, S, S) ~ N(0, 1)
    text       int64 (B, T): tokens in [2, V), then padding (pad_id) after a random length in [1, T]
    prefix_len int64 (B,) ~ U{1, ..., N-1}
"""
from __future__ import annotations

import torch

from aimv2.config import ModelConfig


class RandomBatches:
    def __init__(self, model_cfg: ModelConfig, batch_size: int, *, seed: int = 0, rank: int = 0,
                 world_size: int = 1, device: str | torch.device = "cpu", start_sample: int = 0):
        if batch_size <= 0:
            raise ValueError(f"RandomBatches: batch_size must be > 0, got {batch_size}")
        self.cfg, self.B, self.seed = model_cfg, batch_size, seed
        self.rank, self.world = rank, world_size
        self.device = torch.device(device)
        self.sample = start_sample            # global index of the next micro-step's first sample
        self.tokenizer = None

    def _one(self, k: int):
        c = self.cfg
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        img = torch.randn(c.in_chans, c.img_size, c.img_size, generator=g)      # (3, S, S)
        text = torch.randint(2, c.vocab_size, (c.text_len,), generator=g)       # (T,)
        length = int(torch.randint(1, c.text_len + 1, (1,), generator=g))
        text[length:] = c.pad_id
        plen = torch.randint(1, max(2, c.num_patches), (1,), generator=g)
        return img, text, plen

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        first = self.sample + self.rank * self.B
        imgs, texts, plens = zip(*(self._one(first + j) for j in range(self.B)))
        self.sample += self.world * self.B
        return {"images": torch.stack(imgs).to(self.device),        # (B, 3, S, S)
                "text": torch.stack(texts).to(self.device),         # (B, T)
                "prefix_len": torch.cat(plens).to(self.device)}     # (B,)

    def state_dict(self) -> dict:
        return {"epoch": 0, "sample": self.sample}

    def stats(self) -> dict:
        return {"skipped": 0}


class RandomPackedBatches:
    """`data.source: random` with `data.native`: a deterministic stream of random PackedBatch packs.

    Sample k of rank r's stream comes from a generator seeded with (seed, rank, k) alone: a grid from
    `aimv2.data.native.native_grid` (area ~ U[min_patches, max_patches], aspect ratio log-uniform in
    [1/2, 2]), N(0, 1) patch rows, a caption as RandomBatches', prefix ~ U{1, ..., N_s - 1}. Samples
    join the current pack until the next one would take it past tokens_per_batch patches (the data
    loader's greedy packing, aimv2/data/native.py); the position (state_dict) is the next unused
    sample, so a resumed stream yields the same packs. Each rank has its own stream (pack sizes vary,
    so a global stream cannot be split by count)."""

    def __init__(self, model_cfg: ModelConfig, tokens_per_batch: int, min_patches: int, max_patches: int, *,
                 seed: int = 0, rank: int = 0, device: str | torch.device = "cpu", start_sample: int = 0):
        if not 2 <= min_patches <= max_patches <= tokens_per_batch:
            raise ValueError(f"RandomPackedBatches: need 2 <= min_patches <= max_patches <= tokens_per_batch, "
                             f"got {min_patches}, {max_patches}, {tokens_per_batch}")
        self.cfg, self.tokens, self.lo, self.hi = model_cfg, tokens_per_batch, min_patches, max_patches
        self.seed, self.rank, self.device = seed, rank, torch.device(device)
        self.sample = start_sample
        self.tokenizer = None

    def _one(self, k: int):
        from aimv2.data.native import native_grid
        c, p = self.cfg, self.cfg.patch_size
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.rank) * 1_000_003 + k)
        area = float(torch.empty(()).uniform_(self.lo, self.hi, generator=g))
        aspect = float(torch.empty(()).uniform_(-0.6931, 0.6931, generator=g).exp())     # w / h
        h, w = native_grid(max(1, round((area / aspect) ** 0.5 * p)), max(1, round((area * aspect) ** 0.5 * p)),
                           p, self.lo, self.hi)
        rows = torch.randn(h * w, p * p * c.in_chans, generator=g)                        # (h*w, p*p*C)
        text = torch.randint(2, c.vocab_size, (c.text_len,), generator=g)                 # (T,)
        text[int(torch.randint(1, c.text_len + 1, (1,), generator=g)):] = c.pad_id
        plen = int(torch.randint(1, h * w, (1,), generator=g))
        return rows, (h, w), text, plen

    def __iter__(self):
        return self

    def __next__(self):
        from aimv2.packing import PackedBatch, cu_seqlens_of
        samples, used = [], 0
        while True:
            s = self._one(self.sample)
            n = s[1][0] * s[1][1]
            if samples and used + n > self.tokens:
                break
            samples.append(s)
            used += n
            self.sample += 1
        rows, grids, texts, plens = zip(*samples)
        return PackedBatch(torch.cat(rows), cu_seqlens_of(h * w for h, w in grids), tuple(grids),
                           torch.tensor(plens), torch.stack(texts)).to(self.device)

    def state_dict(self) -> dict:
        return {"epoch": 0, "sample": self.sample}

    def stats(self) -> dict:
        return {"skipped": 0}
