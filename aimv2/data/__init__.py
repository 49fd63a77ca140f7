"""aimv2.data: webdataset shards -> normalised image batches, caption ids and prefix lengths.

    from aimv2.data import DataConfig, build_loader, default_dataset
    loader = build_loader(DataConfig(shards=default_dataset(), batch_size=64))
    for batch in loader:  # {"images": (B,3,224,224) f32, "text": (B,77) i64, "prefix_len": (B,) i64}
        ...
    # DataConfig(..., native=True, tokens_per_batch=16384): aimv2.packing.PackedBatch per batch instead
"""
from .config import IMAGENET_MEAN, IMAGENET_STD, DataConfig
from .loader import Loader, build_loader, dali_available
from .synth import default_dataset, write_synthetic_dataset
from .tokenizer import get_tokenizer, normalize_caption

__all__ = ["DataConfig", "Loader", "build_loader", "dali_available", "default_dataset", "write_synthetic_dataset",
           "get_tokenizer", "normalize_caption", "IMAGENET_MEAN", "IMAGENET_STD"]
