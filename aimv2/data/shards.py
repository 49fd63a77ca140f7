"""Webdataset shards: shard-pattern expansion and a tar index with offsets into each shard.

A webdataset shard is a POSIX tar whose members are grouped into samples by key: the member name
up to the first dot of its basename ("dir/000123.jpg" -> key "dir/000123", extension "jpg"); members
of one sample are consecutive. `index_shard` reads only the 512-byte tar headers (ustar, GNU long
names and pax `path` records supported) and returns, per sample, {ext: (data offset, size)}, so a
sample is later read with one pread per component, in any order.

A truncated shard (a header or member cut by the end of the file, or no end-of-archive blocks) is
indexed up to its last complete member; the sample whose member was cut is dropped and counted.
Indexes are cached as `<shard>.aimv2-index.json` beside the shard or, when that directory is not
writable, under `index_dir` (default ~/.cache/aimv2/index); a cached index is used only while the
shard's size and mtime are unchanged.

`write_dali_index` writes the same information in DALI's `wds2idx` v1.2 format, for users of
`fn.readers.webdataset`.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass, field

__all__ = ["expand_braces", "resolve_shards", "ShardIndex", "index_shard", "load_index", "write_dali_index"]

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_INDEX_VERSION = 1


def expand_braces(pattern: str) -> list[str]:
    """Expand `{a..b}` numeric ranges (zero-padded like the bounds) and `{x,y}` lists, left to right."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    r = _RANGE.fullmatch(body)
    if r:
        a, b = r.group(1), r.group(2)
        lo, hi = int(a), int(b)
        width = max(len(a), len(b)) if (a.startswith("0") or b.startswith("0")) else 0
        step = 1 if hi >= lo else -1
        items = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    elif "," in body:
        items = body.split(",")
    else:  # a literal pair of braces
        return [head + "{" + body + "}" + p for p in expand_braces(tail)]
    return [head + it + rest for it in items for rest in expand_braces(tail)]


def resolve_shards(shards) -> list[str]:
    """Files, directories (every *.tar inside, sorted), globs and brace patterns -> list of tar paths.

    Raises FileNotFoundError naming the pattern when a pattern matches nothing or a path is missing.
    """
    if isinstance(shards, (str, os.PathLike)):
        shards = [shards]
    if not isinstance(shards, (list, tuple)) or not shards:
        raise TypeError(f"shards: expected a path, a pattern or a non-empty list of them, got {shards!r}")
    out: list[str] = []
    for item in shards:
        if not isinstance(item, (str, os.PathLike)):
            raise TypeError(f"shards: expected str paths, got {type(item).__name__} ({item!r})")
        pattern = os.path.expanduser(os.fspath(item))
        expanded = expand_braces(pattern)
        missing = []
        for p in expanded:
            if os.path.isdir(p):
                found = sorted(glob.glob(os.path.join(p, "*.tar")))
                if not found:
                    raise FileNotFoundError(f"shards: directory {p!r} holds no *.tar shard")
                out.extend(found)
            elif glob.has_magic(p):
                out.extend(sorted(glob.glob(p)))
            elif os.path.exists(p):
                out.append(p)
            else:
                missing.append(p)
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise FileNotFoundError(f"shards: {pattern!r}: no such file {', '.join(map(repr, missing[:3]))}{more}")
    if not out:
        raise FileNotFoundError(f"shards: no shard matches {[os.fspath(s) for s in shards]!r}")
    for p in out:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"shards: {p!r} is not a regular file")
        if not os.access(p, os.R_OK):
            raise PermissionError(f"shards: {p!r} is not readable")
    return out


@dataclass
class ShardIndex:
    """Samples of one shard: keys[i] and components[i] = {ext: (offset, size)}."""

    path: str
    keys: list[str] = field(default_factory=list)
    components: list[dict[str, tuple[int, int]]] = field(default_factory=list)
    truncated: bool = False
    dropped: int = 0  # samples lost at the truncation point


class _BadHeader(Exception):
    pass


def _nts(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _parse_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, typeflag) of a 512-byte tar header; None for an all-zero block."""
    if block.count(0) == 512:
        return None
    try:
        stored = int(block[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError as e:
        raise _BadHeader("checksum field") from e
    if stored != sum(block[:148]) + 256 + sum(block[156:]):  # chksum counted as 8 spaces
        raise _BadHeader("checksum mismatch")
    raw = block[124:136]
    if raw[0] & 0x80:  # GNU base-256 size
        size = int.from_bytes(raw[1:], "big")
    else:
        size = int(raw.split(b"\0", 1)[0].strip() or b"0", 8)
    name = _nts(block[0:100])
    if block[257:262] == b"ustar":
        prefix = _nts(block[345:500])
        if prefix:
            name = prefix + "/" + name
    return name, size, block[156:157]


def _pax_path(data: bytes) -> str | None:
    pos = 0
    while pos < len(data):
        sp = data.index(b" ", pos)
        length = int(data[pos:sp])
        rec = data[sp + 1: pos + length - 1]
        k, _, v = rec.partition(b"=")
        if k == b"path":
            return v.decode("utf-8", "surrogateescape")
        pos += length
    return None


def _split_name(name: str) -> tuple[str, str] | None:
    """"dir/000123.seg.jpg" -> ("dir/000123", "seg.jpg"); None for hidden or extension-less names."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith(".") or "." not in base:
        return None
    dot = len(name) - len(base) + base.index(".")
    return name[:dot], name[dot + 1:].lower()


def index_shard(path: str) -> ShardIndex:
    """Read the headers of tar `path` and group its regular-file members into samples."""
    idx = ShardIndex(path)
    cut_key = None  # key of the member cut by the end of the file, when its header was readable
    with open(path, "rb") as f:
        fsize = os.fstat(f.fileno()).st_size
        pos, long_name, ended = 0, None, False
        while pos + 512 <= fsize:
            f.seek(pos)
            try:
                hdr = _parse_header(f.read(512))
            except _BadHeader as e:
                if pos == 0:
                    raise ValueError(f"shards: {path!r} is not a tar archive (bad header at offset 0: {e})") from None
                break  # garbage where a header should be: treat as truncated here
            if hdr is None:
                ended = True
                break
            name, size, kind = hdr
            data = pos + 512
            if data + size > fsize:  # member cut by the end of the file
                split = _split_name(long_name or name)
                cut_key = split[0] if split else None
                break
            pos = data + (size + 511) // 512 * 512
            if kind in (b"L", b"x"):  # GNU long name / pax header for the next member
                f.seek(data)
                payload = f.read(size)
                long_name = _nts(payload) if kind == b"L" else (_pax_path(payload) or long_name)
                continue
            if long_name is not None:
                name, long_name = long_name, None
            if kind not in (b"0", b"\0", b"7"):
                continue  # directories, links, devices, global pax headers
            split = _split_name(name)
            if split is None:
                continue
            key, ext = split
            if not idx.keys or idx.keys[-1] != key:
                idx.keys.append(key)
                idx.components.append({})
            idx.components[-1].setdefault(ext, (data, size))
    idx.truncated = not ended  # cut inside a member or header, garbage, or no end-of-archive blocks
    if idx.truncated and cut_key is not None:
        idx.dropped = 1
        if idx.keys and idx.keys[-1] == cut_key:  # part of that sample is complete: drop it whole
            idx.keys.pop()
            idx.components.pop()
    return idx


def _cache_path(path: str, index_dir: str | None) -> list[str]:
    beside = path + ".aimv2-index.json"
    base = index_dir or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "aimv2", "index")
    digest = hashlib.sha1(os.path.realpath(path).encode("utf-8", "surrogateescape")).hexdigest()[:20]
    cached = os.path.join(base, f"{digest}-{os.path.basename(path)}.json")
    return [cached] if index_dir else [beside, cached]


def load_index(path: str, index_dir: str | None = None) -> ShardIndex:
    """Index of shard `path`, read from its cache when fresh, else built and cached (best effort)."""
    st = os.stat(path)
    stamp = {"version": _INDEX_VERSION, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    candidates = _cache_path(path, index_dir)
    for c in candidates:
        try:
            with open(c, encoding="utf-8") as f:
                d = json.load(f)
            if d.get("stamp") == stamp:
                return ShardIndex(path, d["keys"], [{k: tuple(v) for k, v in comp.items()} for comp in d["components"]],
                                  d["truncated"], d["dropped"])
        except (OSError, ValueError, KeyError):
            continue
    idx = index_shard(path)
    blob = json.dumps({"stamp": stamp, "keys": idx.keys, "components": idx.components,
                       "truncated": idx.truncated, "dropped": idx.dropped})
    for c in candidates:
        try:
            os.makedirs(os.path.dirname(c) or ".", exist_ok=True)
            tmp = f"{c}.tmp-{os.getpid()}"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(blob)
            os.replace(tmp, c)
            break
        except OSError:
            continue
    return idx


def write_dali_index(idx: ShardIndex, out_path: str) -> None:
    """Write `idx` as a DALI wds2idx v1.2 index (`ext offset size name` per component, one sample a line)."""
    lines = [f"v1.2 {len(idx.keys)}"]
    for key, comp in zip(idx.keys, idx.components):
        if any(c.isspace() for c in key):
            raise ValueError(f"{idx.path}: key {key!r} holds whitespace, which DALI index files cannot express")
        lines.append(" ".join(f"{ext} {off} {size} {key}.{ext}" for ext, (off, size) in comp.items()))
    with open(out_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
