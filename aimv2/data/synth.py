"""The embedded captioned dataset: procedural scenes of 1-3 shapes, written as webdataset shards.

Sample i (seed s) is a pure function of (s, i): `render_sample(i, size, seed)` draws from
np.random.default_rng([seed, i]). A scene is a background (colour in {white, gray, black, beige},
pattern in {plain, striped, checkered, dotted, gradient}) and 1-3 shapes; each shape has a kind
(6), a colour (8), a size (small / medium / large = radius 0.12 / 0.19 / 0.28 of the image side), a
texture (solid / striped / dotted, equally likely), a position and a rotation. The first shape is the *main* shape:
it is always strictly the largest and is named first in the caption.

Labels in the JSON: `scene` = the scene's structure as the caption states it, colour and kind left out:
9 * (number of shapes - 1) + 3 * the main shape's size + its texture, 27 codes of which 21 occur (a main
shape among several is never small); the probe target of `aimv2 demo`. `layout` = 15 * main size +
5 * (number of shapes - 1) + the main shape's relation to the second (0 when alone, then above / below /
left of / right of), 45 codes of which 19 occur: the demo's target before VERSION 4 (a one-query attentive
probe reads where shapes lie only barely, see aimv2/demo.py). `label` = the main shape's kind
(`KINDS.index`, NUM_CLASSES = 6 classes). Colour, position, the other shapes and the background vary
within every class of these, so a classifier must read more than the mean colour of the patches, which a
randomly initialised patch embedding passes through (it did for `kind_colour` = kind_index * 8 +
colour_index, 48 classes, the first target).

Caption grammar: "[prefix] a <size> <colour> [<texture>] <kind> [<relation> a <size> <colour> ...
[and a ...]] on a [<pattern>] <bg colour> background", relation in {above, below, to the left of,
to the right of} from the shapes' centres.

Shard layout (what img2dataset writes): `<shard:05d>.tar` holding `<key>.jpg`, `<key>.txt`,
`<key>.json` with key = f"{i:09d}", members in key order, mtime 0 so the bytes are deterministic.
Shards are rendered in a process pool and written to a temporary directory renamed into place at
the end, so an interrupted run never leaves a partial dataset behind.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import tarfile
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["KINDS", "COLOURS", "NUM_CLASSES", "NUM_SCENES", "VERSION", "scene_code", "layout_code", "render_sample", "write_synthetic_dataset", "default_dataset",
           "shard_pattern"]

KINDS = ("circle", "square", "triangle", "star", "hexagon", "cross")
COLOURS = {
    "red": (215, 40, 40), "orange": (240, 140, 30), "yellow": (235, 215, 40), "green": (50, 170, 60),
    "cyan": (40, 200, 210), "blue": (40, 70, 210), "purple": (130, 50, 180), "pink": (240, 120, 180),
}
_COLOUR_NAMES = tuple(COLOURS)
NUM_CLASSES = len(KINDS)       # classes of `label` (the main shape's kind)
# Version of what render_sample writes (pixels, captions, JSON): a cached dataset of another version is
# regenerated. 2: `label` is the main shape's kind (was kind x colour, now `kind_colour`).
VERSION = 4              # 3: the `scene` label; 4: textures equally likely, `scene` = count x size x texture,
                         # the former `scene` kept as `layout`
SIZES = {"small": 0.12, "medium": 0.19, "large": 0.28}
TEXTURES = ("solid", "striped", "dotted")
BACKGROUNDS = {"white": (235, 235, 235), "gray": (128, 128, 128), "black": (25, 25, 25), "beige": (215, 200, 165)}
PATTERNS = ("plain", "striped", "checkered", "dotted", "gradient")
_PREFIXES = ("", "", "a picture of ", "a photo of ", "an image of ")


def _polygon(kind: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    """Vertices of a regular-ish polygon of circumradius r centred at (cx, cy), rotated by rot."""
    if kind == "square":
        ang, rad = [rot + math.pi / 4 + k * math.pi / 2 for k in range(4)], [r] * 4
    elif kind == "triangle":
        ang, rad = [rot - math.pi / 2 + k * 2 * math.pi / 3 for k in range(3)], [r] * 3
    elif kind == "hexagon":
        ang, rad = [rot + k * math.pi / 3 for k in range(6)], [r] * 6
    elif kind == "star":
        ang = [rot - math.pi / 2 + k * math.pi / 5 for k in range(10)]
        rad = [r if k % 2 == 0 else 0.45 * r for k in range(10)]
    elif kind == "cross":
        a = 0.33 * r  # half arm width
        pts = [(-a, -r), (a, -r), (a, -a), (r, -a), (r, a), (a, a), (a, r), (-a, r), (-a, a), (-r, a), (-r, -a), (-a, -a)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]
    else:
        raise ValueError(f"kind: unknown shape {kind!r}")
    return [(cx + q * math.cos(t), cy + q * math.sin(t)) for t, q in zip(ang, rad)]


def _pattern(kind: str, size: int, base: np.ndarray, rng: np.random.Generator,
             box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """A float image of `base` colour with a pattern of a contrasting tint of the same hue.

    Covers the window box = (y0, y1, x0, x1) of a size x size canvas (whole canvas when None):
    returns (y1 - y0, x1 - x0, 3), the pattern phase fixed by canvas coordinates.
    """
    y0, y1, x0, x1 = box if box is not None else (0, size, 0, size)
    img = np.empty((y1 - y0, x1 - x0, 3), np.float32)
    img[:] = base
    alt = np.where(base > 128, base * 0.6, base * 0.6 + 90.0)  # contrasting tint of the same hue
    yy = np.arange(y0, y1, dtype=np.float32)[:, None]  # (h, 1)
    xx = np.arange(x0, x1, dtype=np.float32)[None, :]  # (1, w)
    period = max(4, int(size * rng.uniform(0.06, 0.12)))
    if kind == "striped":
        ang = rng.uniform(0, math.pi)
        mask = ((xx * math.cos(ang) + yy * math.sin(ang)) // (period / 2)) % 2 == 1
    elif kind == "checkered":
        mask = ((xx // period) + (yy // period)) % 2 == 1
    elif kind == "dotted":
        mask = ((xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2) < (period / 4) ** 2
    elif kind == "gradient":
        t = (xx if rng.random() < 0.5 else yy) / max(1, size - 1)
        t = np.broadcast_to(t, img.shape[:2])[..., None]
        return img * (1 - t) + alt * t
    else:  # plain / solid
        return img
    img[np.broadcast_to(mask, img.shape[:2])] = alt
    return img


RELATIONS = ("above", "below", "to the left of", "to the right of")
NUM_SCENES = 27          # codes of `scene`
SCENES_OCCURRING = 21    # of them occur: a main shape among several is never small (tests/test_data_synth.py)
NUM_LAYOUTS = 45         # codes of `layout`, 19 of which occur


def _relation(a: dict, b: dict) -> str:
    """Where shape a lies relative to shape b (centres; the larger offset decides)."""
    dx, dy = a["x"] - b["x"], a["y"] - b["y"]
    if abs(dy) >= abs(dx):
        return "above" if dy < 0 else "below"
    return "to the left of" if dx < 0 else "to the right of"


def scene_code(shapes: list[dict]) -> int:
    """The `scene` label: 9 * (count - 1) + 3 * SIZES index + TEXTURES index of the main shape."""
    main = shapes[0]
    return 9 * (len(shapes) - 1) + 3 * list(SIZES).index(main["size"]) + TEXTURES.index(main["texture"])


def layout_code(shapes: list[dict]) -> int:
    """The `layout` label: 15 * main size + 5 * (count - 1) + relation of the main shape to the second
    (0 alone, 1 + RELATIONS.index otherwise)."""
    rel = 0 if len(shapes) == 1 else 1 + RELATIONS.index(_relation(shapes[0], shapes[1]))
    return 15 * list(SIZES).index(shapes[0]["size"]) + 5 * (len(shapes) - 1) + rel


def _place_shapes(rng: np.random.Generator, n: int, main_size: str, size: int) -> list[dict]:
    """n shapes (the main one first) with kind, colour, size, texture, centre (x, y in [0, 1]) and rotation."""
    shapes = []
    for k in range(n):
        if k == 0:
            sz = main_size
        else:  # secondary shapes are strictly smaller than the main one
            smaller = [s for s in SIZES if SIZES[s] < SIZES[main_size]]
            sz = str(rng.choice(smaller))
        r = SIZES[sz] * size
        shape = {
            "kind": str(rng.choice(KINDS)), "colour": str(rng.choice(_COLOUR_NAMES)), "size": sz,
            "texture": str(rng.choice(TEXTURES)),
        }
        # Place shapes in distinct thirds of the image so they rarely overlap.
        for _ in range(20):
            cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
            if all(math.hypot(cx - s["x"] * size, cy - s["y"] * size) > 0.8 * (r + SIZES[s["size"]] * size) for s in shapes):
                break
        shape.update(x=round(cx / size, 4), y=round(cy / size, 4), rotation=round(float(rng.uniform(0, 2 * math.pi)), 4))
        shapes.append(shape)
    return shapes


def _paint_shapes(canvas: np.ndarray, shapes: list[dict], size: int, rng: np.random.Generator) -> None:
    """Draw `shapes` into canvas (size, size, 3) float32, the secondary ones first so the main shape stays
    fully visible on top."""
    for s in shapes[::-1]:
        mask = Image.new("L", (size, size), 0)
        draw = ImageDraw.Draw(mask)
        cx, cy, r = s["x"] * size, s["y"] * size, SIZES[s["size"]] * size
        if s["kind"] == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
        else:
            draw.polygon(_polygon(s["kind"], cx, cy, r, s["rotation"]), fill=255)
        colour = np.array(COLOURS[s["colour"]], np.float32) + rng.normal(0, 8, 3).astype(np.float32)
        y0, x0 = max(0, int(cy - r) - 1), max(0, int(cx - r) - 1)
        y1, x1 = min(size, int(cy + r) + 2), min(size, int(cx + r) + 2)
        tex = _pattern(s["texture"].replace("solid", "plain"), size, colour, rng, (y0, y1, x0, x1))
        m = np.asarray(mask, np.float32)[y0:y1, x0:x1, None] / 255.0  # (h, w, 1) coverage
        canvas[y0:y1, x0:x1] = canvas[y0:y1, x0:x1] * (1 - m) + tex * m


def _caption(rng: np.random.Generator, shapes: list[dict], bg_pat: str, bg_name: str) -> str:
    def phrase(s):
        tex = "" if s["texture"] == "solid" else s["texture"] + " "
        return f"a {s['size']} {s['colour']} {tex}{s['kind']}"

    text = str(rng.choice(_PREFIXES)) + phrase(shapes[0])
    if len(shapes) > 1:
        text += f" {_relation(shapes[0], shapes[1])} {phrase(shapes[1])}"
    if len(shapes) > 2:
        text += f" and {phrase(shapes[2])}"
    bg_word = "" if bg_pat == "plain" else bg_pat + " "
    return text + f" on a {bg_word}{bg_name} background"


def render_sample(index: int, size: int = 224, seed: int = 0) -> tuple[Image.Image, str, dict]:
    """Scene `index` of dataset `seed`: (RGB PIL image of size x size, caption, metadata dict)."""
    rng = np.random.default_rng([seed, index])
    bg_name = str(rng.choice(list(BACKGROUNDS)))
    bg_pat = str(rng.choice(PATTERNS))
    canvas = _pattern(bg_pat, size, np.array(BACKGROUNDS[bg_name], np.float32), rng)
    n = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    main_size = str(rng.choice(["medium", "large"])) if n > 1 else str(rng.choice(list(SIZES)))
    shapes = _place_shapes(rng, n, main_size, size)
    _paint_shapes(canvas, shapes, size, rng)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * 4.0  # mild sensor noise
    image = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8), "RGB")
    text = _caption(rng, shapes, bg_pat, bg_name)
    main = shapes[0]
    meta = {
        "index": int(index), "label": KINDS.index(main["kind"]),
        "kind_colour": KINDS.index(main["kind"]) * len(COLOURS) + _COLOUR_NAMES.index(main["colour"]),
        "scene": scene_code(shapes), "layout": layout_code(shapes),
        "kind": main["kind"], "colour": main["colour"], "size": main["size"], "texture": main["texture"],
        "background": bg_name, "background_pattern": bg_pat, "num_shapes": n, "shapes": shapes,
    }
    return image, text, meta


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644
    tar.addfile(info, io.BytesIO(data))


def _write_shard(args) -> tuple[str, int]:
    path, lo, hi, size, seed, quality = args
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(lo, hi):
            image, text, meta = render_sample(i, size, seed)
            buf = io.BytesIO()
            image.save(buf, format="JPEG", quality=quality)
            key = f"{i:09d}"
            _add(tar, key + ".jpg", buf.getvalue())
            _add(tar, key + ".txt", text.encode("utf-8"))
            _add(tar, key + ".json", json.dumps(meta, sort_keys=True).encode("utf-8"))
    return path, hi - lo


def shard_pattern(out_dir: str, num_shards: int) -> str:
    """Brace pattern naming `num_shards` shards `00000.tar..` in out_dir."""
    last = num_shards - 1
    return os.path.join(out_dir, "00000.tar" if last == 0 else "{00000..%05d}.tar" % last)


def write_synthetic_dataset(out_dir: str, num: int = 20000, size: int = 224, seed: int = 0,
                            shard_size: int = 1000, progress: bool = True, workers: int | None = None,
                            quality: int = 90) -> list[str]:
    """Render `num` scenes into `ceil(num / shard_size)` shards in out_dir; returns the shard paths.

    Shards are written into a temporary sibling directory and moved into out_dir at the end.
    """
    for name, v, lo in (("num", num, 1), ("size", size, 16), ("shard_size", shard_size, 1)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"{name}: expected an int >= {lo}, got {v!r}")
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
    try:
        nshards = (num + shard_size - 1) // shard_size
        jobs = [(os.path.join(tmp, f"{s:05d}.tar"), s * shard_size, min(num, (s + 1) * shard_size), size, seed, quality)
                for s in range(nshards)]
        workers = min(nshards, workers or os.cpu_count() or 1)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=num, unit="img", desc=f"synth {size}px -> {out_dir}")
        if workers <= 1:
            results = map(_write_shard, jobs)
            pool = contextlib.nullcontext()
        else:  # a worker that dies raises BrokenProcessPool here instead of hanging
            pool = ProcessPoolExecutor(workers, mp_context=get_context("fork" if os.name == "posix" else "spawn"))
            results = pool.map(_write_shard, jobs)
        with pool:
            for _, count in results:
                if bar is not None:
                    bar.update(count)
        if bar is not None:
            bar.close()
        os.makedirs(out_dir, exist_ok=True)
        paths = []
        for s in range(nshards):
            dst = os.path.join(out_dir, f"{s:05d}.tar")
            os.replace(os.path.join(tmp, f"{s:05d}.tar"), dst)
            paths.append(dst)
        return paths
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _current(done: str) -> bool:
    """True when the DONE marker exists and was written by this VERSION of the generator."""
    try:
        with open(done) as f:
            return json.load(f).get("version", 1) == VERSION
    except (OSError, ValueError, AttributeError):
        return False


def default_dataset(root: str | None = None, num: int = 20000, size: int = 224, seed: int = 0,
                    shard_size: int = 1000, progress: bool = True) -> str:
    """Shard pattern of the embedded dataset, generated once into a cache directory.

    root defaults to $XDG_CACHE_HOME/aimv2 (or ~/.cache/aimv2) / synth-<size>-<num>-<seed>. A file
    lock serialises concurrent callers; the dataset is rendered into a temporary directory and
    renamed into place, so a crash mid-generation leaves nothing that looks complete. The DONE marker
    records `VERSION`: a dataset written by another version of this module is generated anew.
    """
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(cache, "aimv2", f"synth-{size}-{num}-{seed}")
    root = os.path.abspath(root)
    nshards = (num + shard_size - 1) // shard_size
    done = os.path.join(root, "DONE")
    if _current(done):
        return shard_pattern(root, nshards)
    os.makedirs(os.path.dirname(root), exist_ok=True)
    import fcntl

    with open(root + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not _current(done):
                staging = root + f".staging-{os.getpid()}"
                shutil.rmtree(staging, ignore_errors=True)
                write_synthetic_dataset(staging, num=num, size=size, seed=seed, shard_size=shard_size, progress=progress)
                with open(os.path.join(staging, "DONE"), "w") as f:
                    json.dump({"num": num, "size": size, "seed": seed, "shard_size": shard_size,
                               "version": VERSION}, f)
                if os.path.exists(root):  # unfinished or outdated: replace it only if it holds nothing but ours
                    ours = re.compile(r"\d{5}\.(tar(\.aimv2-index\.json)?|idx)|DONE")
                    foreign = [f for f in os.listdir(root) if not ours.fullmatch(f)]
                    if foreign:
                        shutil.rmtree(staging, ignore_errors=True)
                        raise FileExistsError(f"default_dataset: {root!r} exists, has no DONE marker and holds "
                                              f"other files ({foreign[:3]}); remove it or pass another root")
                    shutil.rmtree(root)
                os.replace(staging, root)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return shard_pattern(root, nshards)
