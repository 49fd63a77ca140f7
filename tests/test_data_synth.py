"""The embedded synthetic dataset: determinism, captions that match the scene, labels in the pixels, CLI."""
import argparse
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from aimv2.data import cli, synth
from aimv2.data.synth import COLOURS, KINDS, NUM_CLASSES, SIZES, default_dataset, render_sample, write_synthetic_dataset


def _members(path):
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]


def test_deterministic_per_seed_and_sharded(tmp_path):
    a = write_synthetic_dataset(str(tmp_path / "a"), num=30, size=48, seed=4, shard_size=12, progress=False, workers=2)
    b = write_synthetic_dataset(str(tmp_path / "b"), num=30, size=48, seed=4, shard_size=12, progress=False, workers=1)
    c = write_synthetic_dataset(str(tmp_path / "c"), num=30, size=48, seed=5, shard_size=12, progress=False, workers=1)
    assert [os.path.basename(p) for p in a] == ["00000.tar", "00001.tar", "00002.tar"]
    assert all(open(x, "rb").read() == open(y, "rb").read() for x, y in zip(a, b))  # byte-identical
    ma = [m for p in a for m in _members(p)]
    assert [n for n, _ in ma] == [f"{i:09d}.{e}" for i in range(30) for e in ("jpg", "txt", "json")]
    assert ma[1][1] != [m for p in c for m in _members(p)][1][1]  # another seed, another caption
    assert not [d for d in os.listdir(tmp_path) if ".tmp-" in d]  # staging directories removed


def test_captions_labels_and_pixels_agree():
    kinds_seen, labels, colours_per_label = set(), set(), {}
    for i in range(120):
        img, caption, meta = render_sample(i, 96, seed=2)
        assert img.size == (96, 96) and img.mode == "RGB"
        main = meta["shapes"][0]
        assert meta["label"] == KINDS.index(main["kind"]) and 0 <= meta["label"] < NUM_CLASSES == len(KINDS)
        assert meta["kind_colour"] == KINDS.index(main["kind"]) * len(COLOURS) + list(COLOURS).index(main["colour"])
        # the main shape is named first, with its size and colour, and is strictly the largest
        first = caption.split(" on a ")[0]
        assert f"{main['size']} {main['colour']}" in first and main["kind"] in first
        assert caption.find(main["kind"]) <= min(caption.find(s["kind"]) for s in meta["shapes"])
        assert all(SIZES[s["size"]] < SIZES[main["size"]] for s in meta["shapes"][1:])
        assert caption.endswith(f"{meta['background']} background") and len(meta["shapes"]) == meta["num_shapes"]
        if main["texture"] == "solid":  # the centre pixel of a solid main shape shows its colour
            px = np.asarray(img, np.float32)[int(main["y"] * 96), int(main["x"] * 96)]
            assert np.abs(px - np.array(COLOURS[main["colour"]])).max() < 45, (i, px, main)
        kinds_seen.add(main["kind"])
        labels.add(meta["kind_colour"])
        colours_per_label.setdefault(meta["label"], set()).add(main["colour"])
    assert kinds_seen == set(KINDS) and len(labels) > 30
    # colour is a nuisance of the probe label: every class shows the main shape in several colours
    assert all(len(c) >= 4 for c in colours_per_label.values()), colours_per_label


def _caption_body(caption: str) -> str:
    for prefix in ("a picture of ", "a photo of ", "an image of "):
        caption = caption.removeprefix(prefix)
    return caption


def test_scene_label_is_what_the_caption_states():
    """`scene` decoded back = (count, main size, main texture) read off the caption text; 21 codes occur,
    textures equally likely, and colour and kind vary within each (the random encoder's colour shortcut is no
    use to the probe)."""
    from aimv2.data.synth import NUM_SCENES, SCENES_OCCURRING, TEXTURES
    seen, colours, kinds, textures = set(), {}, {}, []
    for i in range(600):
        _, caption, meta = render_sample(i, 32, seed=3)
        code = meta["scene"]
        assert 0 <= code < NUM_SCENES
        count, size, texture = code // 9 + 1, list(SIZES)[code % 9 // 3], TEXTURES[code % 3]
        body = _caption_body(caption)
        assert count == meta["num_shapes"] == (" " + body).count(" a ") - 1, (caption, code)  # minus "on a ... bg"
        main = body.split(" above ")[0].split(" below ")[0].split(" to the ")[0].split(" on a ")[0]
        words = main.split()                                  # "a <size> <colour> [<texture>] <kind>"
        assert words[1] == size and (words[3] if len(words) == 5 else "solid") == texture, (caption, code)
        seen.add(code)
        colours.setdefault(code, set()).add(meta["colour"])
        kinds.setdefault(code, set()).add(meta["kind"])
        textures.append(texture)
    assert len(seen) == SCENES_OCCURRING == 21
    assert all(len(c) >= 4 for c in colours.values()) and all(len(k) >= 4 for k in kinds.values())
    assert all(150 < textures.count(t) < 250 for t in TEXTURES)          # equally likely: 200 each expected


def test_layout_label_is_what_the_caption_states():
    """`layout` (the demo's target before VERSION 4) decoded back = (main size, count, relation word)."""
    from aimv2.data.synth import NUM_LAYOUTS, RELATIONS
    seen = set()
    for i in range(400):
        _, caption, meta = render_sample(i, 32, seed=3)
        code = meta["layout"]
        assert 0 <= code < NUM_LAYOUTS
        size, count, rel = list(SIZES)[code // 15], code % 15 // 5 + 1, code % 5
        body = _caption_body(caption)
        assert count == meta["num_shapes"] and body.startswith(f"a {size} "), (caption, code)
        words = [r for r in RELATIONS if f" {r} a " in caption]
        assert (rel == 0) == (count == 1) and words == ([] if rel == 0 else [RELATIONS[rel - 1]]), (caption, code)
        seen.add(code)
    assert len(seen) == 19


def test_default_dataset_is_cached_and_atomic(tmp_path, monkeypatch):
    root = str(tmp_path / "cache" / "synth")

    def boom(*a, **k):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(synth, "render_sample", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        default_dataset(root, num=10, size=32, shard_size=5, progress=False)
    assert not os.path.exists(root)  # a crash mid-generation leaves no dataset behind
    monkeypatch.undo()
    pattern = default_dataset(root, num=10, size=32, shard_size=5, progress=False)
    assert pattern == os.path.join(root, "{00000..00001}.tar")
    stamp = os.path.getmtime(os.path.join(root, "00000.tar"))
    assert default_dataset(root, num=10, size=32, shard_size=5, progress=False) == pattern
    assert os.path.getmtime(os.path.join(root, "00000.tar")) == stamp  # not regenerated
    assert sorted(os.listdir(tmp_path / "cache")) == ["synth", "synth.lock"]


def test_cli_synth_index_inspect(tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="aimv2")
    cli.register(parser.add_subparsers(dest="cmd", required=True))
    out = str(tmp_path / "ds")
    args = parser.parse_args(["data", "synth", "--out", out, "--num", "9", "--size", "40", "--seed", "1",
                              "--shard-size", "4", "--workers", "1", "--no-progress"])
    assert args.func(args) == 0
    assert sorted(f for f in os.listdir(out) if f.endswith(".tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    caption = _members(os.path.join(out, "00000.tar"))[1][1].decode()
    assert caption == render_sample(0, 40, seed=1)[1]
    args = parser.parse_args(["data", "index", out, "--dali"])
    assert args.func(args) == 0 and os.path.exists(os.path.join(out, "00001.idx"))
    sheet = str(tmp_path / "sheet.png")
    args = parser.parse_args(["data", "inspect", out + "/{00000..00002}.tar", "--sheet", sheet, "--n", "5"])
    assert args.func(args) == 0
    report = capsys.readouterr().out
    assert json.loads(report[report.index("{\n"): report.index("\n}") + 2])["samples"] == 9
    assert Image.open(sheet).size[0] > 0


def test_default_dataset_never_deletes_foreign_files(tmp_path):
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="notes.txt"):
        default_dataset(str(root), num=4, size=32, shard_size=4, progress=False)
    assert (root / "notes.txt").read_text() == "precious"
    assert sorted(os.listdir(tmp_path)) == ["mine", "mine.lock"]  # staging removed


def test_default_dataset_of_another_version_is_regenerated(tmp_path):
    root = str(tmp_path / "synth")
    pattern = default_dataset(root, num=6, size=32, shard_size=3, progress=False)
    with open(os.path.join(root, "DONE")) as f:
        assert json.load(f)["version"] == synth.VERSION
    # a cache written before labels were versioned (no "version" in DONE) holds other JSON: not reused
    with open(os.path.join(root, "DONE"), "w") as f:
        json.dump({"num": 6, "size": 32, "seed": 0, "shard_size": 3}, f)
    tar = os.path.join(root, "00000.tar")
    with open(tar, "wb") as f:
        f.write(b"stale")
    assert default_dataset(root, num=6, size=32, shard_size=3, progress=False) == pattern
    assert _members(tar)[2][0] == "000000000.json"            # rewritten: a readable shard again
    meta = json.loads(_members(tar)[2][1])
    assert meta["label"] == render_sample(0, 32, 0)[2]["label"]
    with open(os.path.join(root, "DONE")) as f:
        assert json.load(f)["version"] == synth.VERSION
