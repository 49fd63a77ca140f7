"""DataConfig: everything that defines the stream of batches a Loader yields (one per component)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Union

__all__ = ["DataConfig", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataConfig:
    """Webdataset loading for AIMv2 pre-training (SPEC §5 augmentation, §2 prefix lengths).

    shards: a path, a directory (every *.tar in it), a glob or a brace pattern such as
      "shards/{00000..00099}.tar", or a list of those.
    backend: "dali" | "torch" | "auto" (DALI when importable).
    num_workers: DALI CPU threads / torch DataLoader worker processes (0 = decode in the main process).
    train: True = random resized crop (scale 0.4-1, ratio 3/4-4/3, bicubic) + horizontal flip, shard and
      buffer shuffle, endless epochs, last partial batch dropped. False = resize the shorter side and
      centre-crop, no flip, no shuffle, one pass in shard order, last partial batch kept.
    start_epoch / start_sample: resume position, as returned by Loader.state_dict().
    prefix: "random" (P ~ U{1..N-1} per sample), "full" (P = N) or an int P for every sample.
    max_image_pixels: images whose header declares more pixels are skipped before decoding.
    index_dir: where shard indexes are cached when the shard directory is not writable.
    return_keys: also yield `keys` (list of "<shard path>:<sample key>") for debugging and tests.
    """

    shards: Union[str, Sequence[str]] = ""
    image_size: int = 224
    patch_size: int = 14
    batch_size: int = 64
    backend: str = "auto"
    num_workers: int = 2
    shuffle_buffer: int = 1000
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    device: str = "cpu"
    tokenizer: Optional[object] = None
    text_len: int = 77
    train: bool = True
    label_key: Optional[str] = None
    drop_last: Optional[bool] = None  # None: True when train, False otherwise
    start_epoch: int = 0
    start_sample: int = 0
    prefix: Union[str, int] = "random"
    max_image_pixels: int = 64_000_000
    index_dir: Optional[str] = None
    return_keys: bool = False

    def validate(self) -> "DataConfig":
        """Raise ValueError naming the first bad field; return self."""
        def need(cond, name, what):
            if not cond:
                raise ValueError(f"DataConfig.{name}: expected {what}, got {getattr(self, name)!r}")

        need(self.shards not in ("", None, [], ()), "shards", "a shard path, pattern or list")
        for name in ("image_size", "patch_size", "batch_size", "text_len", "world_size"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "a positive int")
        need(self.image_size % self.patch_size == 0, "image_size", f"a multiple of patch_size={self.patch_size}")
        need((self.image_size // self.patch_size) ** 2 >= 2, "image_size", "at least 2 patches")
        need(self.backend in ("dali", "torch", "auto"), "backend", '"dali", "torch" or "auto"')
        need(isinstance(self.num_workers, int) and self.num_workers >= 0, "num_workers", "an int >= 0")
        need(isinstance(self.shuffle_buffer, int) and self.shuffle_buffer >= 0, "shuffle_buffer", "an int >= 0")
        need(isinstance(self.rank, int) and 0 <= self.rank < self.world_size, "rank",
             f"0 <= rank < world_size={self.world_size}")
        need(isinstance(self.start_epoch, int) and self.start_epoch >= 0, "start_epoch", "an int >= 0")
        need(isinstance(self.start_sample, int) and self.start_sample >= 0, "start_sample", "an int >= 0")
        n = (self.image_size // self.patch_size) ** 2
        need(self.prefix in ("random", "full") or (isinstance(self.prefix, int) and 0 <= self.prefix <= n),
             "prefix", f'"random", "full" or an int in [0, {n}]')
        need(str(self.device).split(":")[0] in ("cpu", "cuda"), "device", '"cpu" or "cuda[:i]"')
        return self

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def keep_last(self) -> bool:
        """True when the last partial batch of an epoch is yielded."""
        return not (self.train if self.drop_last is None else self.drop_last)
