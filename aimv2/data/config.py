"""DataConfig: everything that defines the stream of batches a Loader yields (one per component)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Optional, Sequence, Union

__all__ = ["DataConfig", "IMAGENET_MEAN", "IMAGENET_STD", "context_fields"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _context(source: str, default):
    """A field whoever builds the Loader fills in from its context (`source`), not a user setting:
    TrainConfig does not expose it (the trainer sets it from the model, process group or checkpoint)."""
    return field(default=default, metadata={"context": source})


def context_fields() -> frozenset[str]:
    """Names of the DataConfig fields set from the caller's context (see `_context`)."""
    return frozenset(f.name for f in fields(DataConfig) if "context" in f.metadata)


@dataclass
class DataConfig:
    """Webdataset loading for AIMv2 pre-training (method.md §5 augmentation, §2 prefix lengths).

    shards: a path, a directory (every *.tar in it), a glob or a brace pattern such as
      "shards/{00000..00099}.tar", or a list of those.
    backend: "dali" | "torch" | "auto" (DALI on a GPU when importable, torch on the CPU: what was measured
      fastest on each, loader.pick_backend; the choice and its reason are logged).
    num_workers: DALI CPU threads / torch DataLoader worker processes (0 = decode in the main process).
    train: True = random resized crop (area fraction in crop_scale, aspect ratio w / h in crop_ratio,
      bicubic; aimv2.data.augment) + horizontal flip (hflip), shard and buffer shuffle, endless epochs, last
      partial batch dropped. False = resize the shorter side and centre-crop, no flip, no shuffle,
      one pass in shard order, last partial batch kept.
    start_epoch / start_sample: resume position, as returned by Loader.state_dict().
    prefix: "random" (P ~ U{1..N-1} per sample), "full" (P = N) or an int P for every sample.
    max_image_pixels: images whose header declares more pixels are skipped before decoding.
    index_dir: where shard indexes are cached when the shard directory is not writable.
    return_keys: also yield `keys` (list of "<shard path>:<sample key>") for debugging and tests.
    crop_scale / crop_ratio: RandomResizedCrop's area-fraction and aspect-ratio (w / h) ranges.
    hflip: mirror half of the training crops (p = 0.5). Turn it off when captions name left and right (a
      mirrored "a circle to the left of a square" is false); the flip's draw is consumed either way, so
      the crop boxes do not change with it.
    native: native-resolution mode (aimv2.data.native, method.md §8): each crop (train) or whole image
      (eval) is resized to its own patch grid, aspect ratio kept, min_patches <= h * w <= max_patches,
      and samples are packed greedily into batches of at most tokens_per_batch patches; the Loader
      yields aimv2.packing.PackedBatch instead of dicts, and image_size / batch_size are not used.

    Fields declared with `_context(...)` are filled in by whoever builds the Loader from its context:
    "model" (sizes), "process" (rank, world, device), "checkpoint" (resume position), "caller" (mode).
    """

    _name = "DataConfig"  # how error messages name this config (a subclass may name its YAML section)
    shards: Union[str, Sequence[str]] = ""
    image_size: int = _context("model", 224)
    patch_size: int = _context("model", 14)
    batch_size: int = 64
    backend: str = "auto"
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    rank: int = _context("process", 0)
    world_size: int = _context("process", 1)
    device: str = _context("process", "cpu")
    tokenizer: Optional[object] = None
    text_len: int = _context("model", 77)
    train: bool = _context("caller", True)
    label_key: Optional[str] = _context("caller", None)
    drop_last: Optional[bool] = _context("caller", None)  # None: True when train, False otherwise
    start_epoch: int = _context("checkpoint", 0)
    start_sample: int = _context("checkpoint", 0)
    prefix: Union[str, int] = "random"
    max_image_pixels: int = 64_000_000
    index_dir: Optional[str] = None
    return_keys: bool = _context("caller", False)
    crop_scale: tuple[float, float] = (0.4, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    native: bool = False
    min_patches: int = 256
    max_patches: int = 1024
    tokens_per_batch: int = 16384

    def validate(self) -> "DataConfig":
        """Raise ValueError naming the first bad field; return self."""
        def need(cond, name, what):
            if not cond:
                raise ValueError(f"{self._name}.{name}: expected {what}, got {getattr(self, name)!r}")

        need(self.shards not in ("", None, [], ()), "shards", "a shard path, pattern or list")
        for name in ("image_size", "patch_size", "batch_size", "text_len", "world_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "a positive int")
        need(self.image_size % self.patch_size == 0, "image_size", f"a multiple of patch_size={self.patch_size}")
        need((self.image_size // self.patch_size) ** 2 >= 2, "image_size", "at least 2 patches")
        need(self.backend in ("dali", "torch", "auto"), "backend", '"dali", "torch" or "auto"')
        need(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", "an int >= 0")
        need(isinstance(self.hflip, bool), "hflip", "true or false")
        need(isinstance(self.shuffle_buffer, int) and self.shuffle_buffer >= 0, "shuffle_buffer", "an int >= 0")
        need(isinstance(self.rank, int) and 0 <= self.rank < self.world_size, "rank",
             f"0 <= rank < world_size={self.world_size}")
        need(isinstance(self.start_epoch, int) and self.start_epoch >= 0, "start_epoch", "an int >= 0")
        need(isinstance(self.start_sample, int) and self.start_sample >= 0, "start_sample", "an int >= 0")
        need(str(self.device).split(":")[0] in ("cpu", "cuda"), "device", '"cpu" or "cuda[:i]"')
        lo, hi = _pair(self.crop_scale)
        need(0 < lo <= hi <= 1, "crop_scale", "(lo, hi) with 0 < lo <= hi <= 1 (fractions of the image area)")
        lo, hi = _pair(self.crop_ratio)
        need(0 < lo <= hi, "crop_ratio", "(lo, hi) with 0 < lo <= hi (aspect ratios w / h)")
        need(isinstance(self.native, bool), "native", "True or False")
        if self.native:
            for name in ("min_patches", "max_patches", "tokens_per_batch"):
                need(isinstance(getattr(self, name), int) and not isinstance(getattr(self, name), bool),
                     name, "an int")
            need(self.min_patches >= 2, "min_patches", "an int >= 2 (a prefix U{1..N-1} needs N >= 2)")
            need(self.max_patches >= self.min_patches, "max_patches", f">= min_patches={self.min_patches}")
            need(self.tokens_per_batch >= self.max_patches, "tokens_per_batch",
                 f">= max_patches={self.max_patches} (every image must fit in a batch)")
            need(self.label_key is None, "label_key", "None in native mode (PackedBatch carries no labels)")
            need(not self.return_keys, "return_keys", "False in native mode (PackedBatch carries no keys)")
        n = self.max_patches if self.native else (self.image_size // self.patch_size) ** 2
        need(self.prefix in ("random", "full") or (isinstance(self.prefix, int) and 0 <= self.prefix <= n),
             "prefix", f'"random", "full" or an int in [0, {n}]')
        return self

    @property
    def max_images_per_batch(self) -> int:
        """Most images one batch holds: batch_size, or in native mode tokens_per_batch // min_patches."""
        return self.tokens_per_batch // self.min_patches if self.native else self.batch_size

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def keep_last(self) -> bool:
        """True when the last partial batch of an epoch is yielded."""
        return not (self.train if self.drop_last is None else self.drop_last)


def _pair(v) -> tuple[float, float]:
    """(lo, hi) when v is two real numbers, else (nan, nan) so that every range check fails."""
    ok = isinstance(v, (tuple, list)) and len(v) == 2 and all(
        isinstance(a, (int, float)) and not isinstance(a, bool) for a in v)
    return (float(v[0]), float(v[1])) if ok else (math.nan, math.nan)
