"""Bad data is skipped and counted, good samples still arrive exactly once; hopeless inputs fail clearly."""
import os
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest

from aimv2.data import DataConfig, build_loader, dali_available
from aimv2.data.shards import index_shard
from aimv2.data.testing import bad_samples, good_sample, write_shard

BACKENDS = ["torch"] + (["dali"] if dali_available() else [])


@pytest.fixture(scope="module")
def dirty(tmp_path_factory):
    """3 shards of good samples interleaved with every kind of breakage, plus a truncated shard."""
    d = tmp_path_factory.mktemp("dirty")
    rng = np.random.default_rng(7)
    good, expected = [], Counter()
    for s in range(3):
        samples = []
        for i in range(10):
            g = good_sample(f"s{s}_{i:02d}", rng, width=int(rng.integers(40, 130)), height=int(rng.integers(40, 130)),
                            label=i)
            samples.append(g)
            good.append(f"{d}/{s:05d}.tar:{g['__key__']}")
            if i % 3 == 1:
                for reason, bad in bad_samples(rng, prefix=f"s{s}_{i}").items():
                    samples.append(bad)
                    expected[reason.replace("_decode", "")] += 1
        write_shard(str(d / f"{s:05d}.tar"), samples)
    # shard 3: 5 good samples, the file cut inside the 5th sample's image
    samples = [good_sample(f"t_{i}", rng) for i in range(5)]
    path = write_shard(str(d / "00003.tar"), samples)
    off, n = index_shard(path).components[4]["jpg"]
    write_shard(path, samples, truncate_at=off + n // 2)
    good += [f"{path}:t_{i}" for i in range(4)]
    expected["truncated_shard"] += 1
    return str(d / "{00000..00003}.tar"), sorted(good), expected


def _cfg(pattern, backend, **kw):
    base = dict(shards=pattern, image_size=28, patch_size=14, batch_size=4, backend=backend, num_workers=1,
                shuffle_buffer=8, label_key="label", return_keys=True, seed=1)
    return DataConfig(**{**base, **kw})


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_good_sample_once_and_bad_ones_counted(dirty, backend):
    pattern, good, expected = dirty
    loader = build_loader(_cfg(pattern, backend, train=False))
    keys = [k for b in loader for k in b["keys"]]
    assert sorted(keys) == good and len(keys) == len(set(keys))
    stats = loader.stats()
    got = {k[len("skipped_"):]: v for k, v in stats.items() if k.startswith("skipped_")}
    assert got == dict(expected), stats
    assert stats["skipped"] == sum(expected.values()) and stats["samples"] == len(good)
    assert stats["truncated_shards"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_epochs_survive_bad_data_and_resume(dirty, backend):
    pattern, good, _ = dirty
    cfg = _cfg(pattern, backend)
    loader = build_loader(cfg)
    it = iter(loader)
    per_epoch = Counter()
    run = []
    while True:
        b = next(it)
        st = loader.state_dict()
        if st["epoch"] == 2:
            break
        run.append((b, st))
        per_epoch.update((st["epoch"], k) for k in b["keys"])
    n = len(good) // 4 * 4  # drop_last: fewer than 4 left over are dropped
    for e in (0, 1):
        keys = [k for (ep, k) in per_epoch if ep == e]
        assert len(keys) == n and set(keys) <= set(good) and max(per_epoch.values()) == 1
    st = run[5][1]
    resumed = build_loader(replace(cfg, start_epoch=st["epoch"], start_sample=st["sample"]))
    it2 = iter(resumed)
    for b, s in run[6:]:
        c = next(it2)
        assert c["keys"] == b["keys"] and resumed.state_dict() == s
        assert (c["images"] == b["images"]).all() and (c["prefix_len"] == b["prefix_len"]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_bad_names_the_shard(tmp_path, backend):
    rng = np.random.default_rng(0)
    path = write_shard(str(tmp_path / "bad.tar"), list(bad_samples(rng).values()))
    with pytest.raises(RuntimeError, match="bad.tar"):
        next(iter(build_loader(_cfg(path, backend))))
    with pytest.raises(RuntimeError, match="every sample"):
        list(build_loader(_cfg(path, backend, train=False)))


def test_clear_errors_for_missing_or_unreadable_shards(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere"):
        build_loader(_cfg(str(tmp_path / "nothere/{000..003}.tar"), "torch"))
    with pytest.raises(FileNotFoundError, match=r"\*\.tar"):
        build_loader(_cfg(str(tmp_path), "torch"))  # a directory without shards
    with pytest.raises(FileNotFoundError, match="no shard matches"):
        build_loader(_cfg(str(tmp_path / "*.tar"), "torch"))
    junk = tmp_path / "junk.tar"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="junk.tar.*not a tar"):
        build_loader(_cfg(str(junk), "torch"))
    rng = np.random.default_rng(0)
    few = write_shard(str(tmp_path / "few.tar"), [good_sample(f"k{i}", rng) for i in range(3)])
    with pytest.raises(ValueError, match="batch_size=4"):
        next(iter(build_loader(_cfg(few, "torch"))))
    with pytest.raises(ValueError, match="DataConfig.rank"):
        build_loader(_cfg(few, "torch", rank=2, world_size=2))
    with pytest.raises(ValueError, match="DataConfig.image_size"):
        build_loader(_cfg(few, "torch", image_size=30))
