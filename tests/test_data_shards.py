"""Shard patterns and the tar index: offsets equal tarfile's, long names, truncation, caching, DALI format."""
import io
import os
import tarfile

import numpy as np
import pytest

from aimv2.data.shards import expand_braces, index_shard, load_index, resolve_shards, write_dali_index
from aimv2.data.testing import good_sample, write_shard


def test_expand_braces():
    assert expand_braces("s/{00008..00011}.tar") == [f"s/{i:05d}.tar" for i in range(8, 12)]
    assert expand_braces("{9..11}") == ["9", "10", "11"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]
    assert expand_braces("a{x,y}{0..1}") == ["ax0", "ax1", "ay0", "ay1"]
    assert expand_braces("plain{}") == ["plain{}"]


def test_resolve_files_dirs_globs(tmp_path):
    for i in range(3):
        (tmp_path / f"{i:03d}.tar").write_bytes(b"")
    (tmp_path / "note.txt").write_text("x")
    d = str(tmp_path)
    want = [f"{d}/{i:03d}.tar" for i in range(3)]
    assert resolve_shards(d) == want
    assert resolve_shards(d + "/{000..002}.tar") == want
    assert resolve_shards(d + "/*.tar") == want
    assert resolve_shards([want[2], d + "/{000..001}.tar"]) == [want[2]] + want[:2]
    with pytest.raises(FileNotFoundError, match="003.tar"):
        resolve_shards(d + "/{000..003}.tar")
    with pytest.raises(TypeError, match="shards"):
        resolve_shards(3)


def _tar_with_long_names(path, fmt):
    rng = np.random.default_rng(0)
    long_dir = "d" * 120 + "/"
    with tarfile.open(path, "w", format=fmt) as tar:
        di = tarfile.TarInfo("subdir")
        di.type = tarfile.DIRTYPE
        tar.addfile(di)
        for i, name in enumerate(["a/000.jpg", "a/000.txt", long_dir + "001.jpg", long_dir + "001.txt",
                                  ".hidden.txt", "002.jpg", "002.seg.png", "002.TXT"]):
            data = rng.bytes(int(rng.integers(1, 1500)))
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_index_offsets_match_tarfile(tmp_path, fmt):
    path = str(tmp_path / "x.tar")
    _tar_with_long_names(path, fmt)
    idx = index_shard(path)
    assert idx.keys == ["a/000", "d" * 120 + "/001", "002"] and not idx.truncated
    assert set(idx.components[2]) == {"jpg", "seg.png", "txt"}  # extensions lower-cased
    with tarfile.open(path) as tar:
        members = {m.name: m for m in tar.getmembers() if m.isfile()}
        for key, comp in zip(idx.keys, idx.components):
            for ext, (off, size) in comp.items():
                name = next(n for n in members if n.lower() == f"{key}.{ext}")
                assert (off, size) == (members[name].offset_data, members[name].size)
                with open(path, "rb") as f:
                    f.seek(off)
                    assert f.read(size) == tar.extractfile(members[name]).read()


def test_truncation_drops_only_the_cut_sample(tmp_path):
    rng = np.random.default_rng(1)
    samples = [good_sample(f"k{i}", rng) for i in range(4)]
    path = write_shard(str(tmp_path / "t.tar"), samples)
    full = index_shard(path)
    assert full.keys == ["k0", "k1", "k2", "k3"] and not full.truncated
    data = open(path, "rb").read()
    cases = {  # cut point -> surviving keys
        full.components[2]["txt"][0] + 3: ["k0", "k1"],  # inside k2's caption: k2 dropped
        full.components[3]["jpg"][0] - 200: ["k0", "k1", "k2"],  # inside k3's jpg header block
        full.components[3]["json"][0] + full.components[3]["json"][1]: ["k0", "k1", "k2", "k3"],  # no EOF blocks
        100: [],
    }
    for cut, keys in cases.items():
        with open(path, "wb") as f:
            f.write(data[:cut])
        idx = index_shard(path)
        assert idx.truncated and idx.keys == keys, cut
    with open(path, "wb") as f:
        f.write(data[:0])
    assert index_shard(path).keys == [] and index_shard(path).truncated


def test_index_cache_beside_shard_or_in_index_dir(tmp_path):
    rng = np.random.default_rng(2)
    path = write_shard(str(tmp_path / "c.tar"), [good_sample(f"k{i}", rng) for i in range(3)])
    idx = load_index(path)
    assert os.path.exists(path + ".aimv2-index.json") and idx.keys == ["k0", "k1", "k2"]
    assert load_index(path).components == idx.components
    write_shard(path, [good_sample(f"z{i}", rng) for i in range(2)])  # shard rewritten: cache is stale
    os.utime(path, ns=(1, 1))
    assert load_index(path).keys == ["z0", "z1"]
    cache = tmp_path / "cache"
    assert load_index(path, index_dir=str(cache)).keys == ["z0", "z1"]
    assert len(list(cache.iterdir())) == 1


def test_dali_index_format_matches_wds2idx(tmp_path):
    wds2idx = pytest.importorskip("wds2idx")
    rng = np.random.default_rng(3)
    path = write_shard(str(tmp_path / "w.tar"), [good_sample(f"k{i}", rng) for i in range(3)])
    ours, theirs = str(tmp_path / "ours.idx"), str(tmp_path / "theirs.idx")
    write_dali_index(index_shard(path), ours)
    with wds2idx.IndexCreator(path, theirs, verbose=False) as ic:
        ic.create_index()
    assert open(ours).read().split() == open(theirs).read().split()


def test_index_falls_back_to_cache_dir_when_beside_is_unwritable(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    path = write_shard(str(tmp_path / "ro.tar"), [good_sample(f"k{i}", rng) for i in range(2)])
    os.mkdir(path + ".aimv2-index.json")  # makes the file beside the shard impossible to write (even as root)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_index(path).keys == ["k0", "k1"]
    cached = list((tmp_path / "xdg" / "aimv2" / "index").iterdir())
    assert len(cached) == 1 and cached[0].name.endswith("-ro.tar.json")
    assert load_index(path).keys == ["k0", "k1"]  # served from the cache now
