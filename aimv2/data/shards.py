"""Webdataset shards: shard-pattern expansion and a tar index with offsets into each shard.

A webdataset shard is a POSIX tar whose members are grouped into samples by key: the member name
up to the first dot of its basename ("dir/000123.jpg" -> key "dir/000123", extension "jpg"); members
of one sample are consecutive. `index_shard` reads only the 512-byte tar headers (ustar, GNU long
names and pax `path` records supported) and returns, per sample, {ext: (data offset, size)}, so a
sample is later read with one pread per component, in any order.

A truncated shard (a header or member cut by the end of the file, or no end-of-archive blocks) is
indexed up to its last complete member; the sample whose member was cut is dropped and counted.
Damage inside a shard never stops the index and never loops: a header block that fails its checksum
or holds an unparsable field is skipped by resynchronising at the next checksum-valid header (as
GNU tar does; 512-byte aligned, or any offset holding a ustar header or, for v7 headers without the
magic, a checksum field written as tar writes it); a malformed pax extended
header or GNU long name (bad record length, record past the header's end, absurd size) is skipped
together with the member it describes. Each is recorded in `ShardIndex.damaged` as
(offset, bytes skipped, reason, detail) and logged naming the shard and offset; the Loader counts
them as `skipped_bad_tar_header` / `skipped_bad_pax_header`. A shard that is not a tar at offset 0
(gzip or another compressed tar included) is an error naming it; compressed tars inside a shard
directory are not read (no random access into a compressed stream) and are named in a warning.
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
import logging
import os
import re
from dataclasses import dataclass, field

__all__ = ["expand_braces", "resolve_shards", "ShardIndex", "index_shard", "load_index", "write_dali_index"]

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)")
_CHKSUM_DIGITS = re.compile(rb"[ 0-7]{6}")  # the checksum field before its "\0 ": "%06o" (v7: "%6o")
_INDEX_VERSION = 3          # 3: v7 headers recovered after unaligned garbage (cached v2 indexes are rebuilt)
_META_MAX = 1 << 20  # a pax header or GNU long name larger than this is damage, not metadata
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz", b"\x28\xb5\x2f\xfd": "zstd"}
_COMPRESSED_SUFFIXES = (".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".tzst")

log = logging.getLogger(__name__)


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
                packed = sorted(n for n in os.listdir(p) if n.lower().endswith(_COMPRESSED_SUFFIXES))
                note = (f"{len(packed)} compressed tar(s) not read (no random access into a compressed stream; "
                        f"decompress them to .tar): {', '.join(packed[:3])}{' ...' if len(packed) > 3 else ''}")
                if not found:
                    raise FileNotFoundError(f"shards: directory {p!r} holds no *.tar shard" + (f"; {note}" if packed else ""))
                if packed:
                    log.warning("shards: directory %r: %s", p, note)
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
    """Samples of one shard: keys[i] and components[i] = {ext: (offset, size)}.

    damaged: [(offset, bytes skipped, reason, detail)] for each damaged region / member skipped, reason
    "bad_tar_header" (a header failing its checksum or parse; skipped up to the next valid header) or
    "bad_pax_header" (a malformed pax header or GNU long name; skipped with the member it describes).
    """

    path: str
    keys: list[str] = field(default_factory=list)
    components: list[dict[str, tuple[int, int]]] = field(default_factory=list)
    truncated: bool = False
    dropped: int = 0  # samples lost at the truncation point
    damaged: list[tuple[int, int, str, str]] = field(default_factory=list)


class _BadHeader(Exception):
    pass


def _nts(b: bytes) -> str:
    return b.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _octal(field_: bytes, what: str) -> int:
    """A tar numeric field: octal digits padded with spaces / NULs, or GNU base-256 (non-negative only)."""
    if field_[0] & 0x80 and what == "size":
        if field_[0] != 0x80:  # 0xff: negative base-256
            raise _BadHeader(f"negative base-256 {what}")
        return int.from_bytes(field_[1:], "big")
    digits = field_.split(b"\0", 1)[0].strip()
    if digits and not all(0x30 <= c <= 0x37 for c in digits):
        raise _BadHeader(f"{what} field {bytes(field_)!r} is not octal")
    return int(digits or b"0", 8)


def _parse_header(block: bytes) -> tuple[str, int, bytes] | None:
    """(name, size, typeflag) of a 512-byte tar header; None for an all-zero block; _BadHeader if damaged."""
    if block.count(0) == 512:
        return None
    stored = _octal(block[148:156], "checksum")
    if stored != sum(block[:148]) + 256 + sum(block[156:]):  # chksum counted as 8 spaces
        raise _BadHeader("checksum mismatch")
    size = _octal(block[124:136], "size")
    name = _nts(block[0:100])
    if block[257:262] == b"ustar":
        prefix = _nts(block[345:500])
        if prefix:
            name = prefix + "/" + name
    return name, size, block[156:157]


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """Records "<len> <key>=<value>\n" of a pax extended header; _BadHeader on any malformed record.

    Every record must advance the position by its (decimal, >= 5) length and end inside the header
    with a newline, so a length of 0, a negative or non-numeric length, or one running past the end
    is reported instead of looping or raising a bare ValueError."""
    out, pos, n = {}, 0, len(data)
    while pos < n:
        if data[pos] == 0 and data.count(0, pos) == n - pos:
            break  # NUL padding after the last record
        sp = data.find(b" ", pos, min(n, pos + 24))
        digits = data[pos:sp] if sp >= 0 else b""
        if not digits.isdigit():
            raise _BadHeader(f"pax record at +{pos}: length {data[pos:pos + 12]!r} is not a decimal number")
        length = int(digits)
        end = pos + length
        if length < len(digits) + 4 or end > n or data[end - 1] != 0x0A:
            raise _BadHeader(f"pax record at +{pos}: length {length} does not fit the {n}-byte header")
        key, eq, value = data[sp + 1: end - 1].partition(b"=")
        if not eq or not key:
            raise _BadHeader(f"pax record at +{pos}: no key=value")
        out[key] = value
        pos = end
    return out


def _split_name(name: str) -> tuple[str, str] | None:
    """"dir/000123.seg.jpg" -> ("dir/000123", "seg.jpg"); None for hidden or extension-less names."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith(".") or "." not in base:
        return None
    dot = len(name) - len(base) + base.index(".")
    return name[:dot], name[dot + 1:].lower()


def _resync(f, start: int, fsize: int) -> int | None:
    """Offset of the first valid (checksum-correct) header at or after `start`, else None.

    Candidates are 512-byte aligned blocks (GNU tar's recovery) and, for garbage whose length is not a
    multiple of 512, any offset whose block carries the "ustar" magic or (v7 headers have no magic) whose
    checksum field reads as tar writes it, six octal digits or spaces then "\0 " (bytes 148-155)."""
    chunk = 1 << 20
    pos = start
    while pos + 512 <= fsize:
        f.seek(pos)
        buf = f.read(chunk + 511)
        cands = set(range(-pos % 512, len(buf) - 511, 512))
        i = buf.find(b"ustar", 257)
        while i >= 0:
            if i - 257 + 512 <= len(buf):
                cands.add(i - 257)
            i = buf.find(b"ustar", i + 1)
        i = buf.find(b"\0 ", 154)
        while i >= 0:
            if i - 154 + 512 <= len(buf) and _CHKSUM_DIGITS.fullmatch(buf, i - 6, i):
                cands.add(i - 154)
            i = buf.find(b"\0 ", i + 1)
        for c in sorted(cands):
            block = buf[c: c + 512]
            if block.count(0) == 512:
                continue  # zero blocks inside a damaged region are not the end of the archive
            try:
                if _parse_header(block) is not None:
                    return pos + c
            except _BadHeader:
                continue
        pos += chunk
    return None


def _describe(raw: bytes) -> str:
    if any(raw.startswith(m) for m in _COMPRESSED):
        kind = next(v for m, v in _COMPRESSED.items() if raw.startswith(m))
        return f"it is {kind}-compressed; decompress it to a plain .tar (shards need random access)"
    return "bad header at offset 0"


def _after_damage(f, idx: ShardIndex, pos: int, fsize: int, block: bytes, err: _BadHeader) -> int | None:
    """Record the damaged header at `pos` and return the next valid header's offset (None: none left);
    at offset 0 the file is not a tar: ValueError naming it."""
    if pos == 0:
        raise ValueError(f"shards: {idx.path!r} is not a tar archive ({_describe(block)}: {err})") from None
    nxt = _resync(f, pos + 1, fsize)
    skipped = (nxt if nxt is not None else fsize) - pos
    idx.damaged.append((pos, skipped, "bad_tar_header", str(err)))
    return nxt


def _read_meta(f, kind: bytes, data: int, size: int, meta: dict) -> None:
    """A long-name (L) or pax (x / X) header's payload at `data` into `meta` ("path", "size");
    _BadHeader when it is malformed."""
    if size > _META_MAX:
        raise _BadHeader(f"{size}-byte metadata header (limit {_META_MAX})")
    f.seek(data)
    payload = f.read(size)
    if kind == b"L":
        meta["path"] = _nts(payload)
        return
    rec = _pax_records(payload)
    if b"path" in rec:
        meta["path"] = rec[b"path"].decode("utf-8", "surrogateescape")
    if b"size" in rec:
        if not rec[b"size"].isdigit():
            raise _BadHeader(f"pax size {rec[b'size'][:20]!r} is not a decimal number")
        meta["size"] = int(rec[b"size"])


def _add_member(idx: ShardIndex, name: str, kind: bytes, data: int, size: int) -> None:
    """A regular file's (offset, size) under its sample key and extension; other members are ignored."""
    if kind not in (b"0", b"\0", b"7"):
        return  # directories, links, devices
    split = _split_name(name)
    if split is None:
        return
    key, ext = split
    if not idx.keys or idx.keys[-1] != key:
        idx.keys.append(key)
        idx.components.append({})
    idx.components[-1].setdefault(ext, (data, size))


def _mark_truncated(idx: ShardIndex, ended: bool, cut_key: str | None) -> ShardIndex:
    idx.truncated = not ended  # cut inside a member or header, garbage, or no end-of-archive blocks
    if idx.truncated and cut_key is not None:
        idx.dropped = 1
        if idx.keys and idx.keys[-1] == cut_key:  # part of that sample is complete: drop it whole
            idx.keys.pop()
            idx.components.pop()
    return idx


def index_shard(path: str) -> ShardIndex:
    """Read the headers of tar `path` and group its regular-file members into samples.

    Raises ValueError naming `path` when offset 0 holds no tar header; damage further in is recorded
    in `damaged` (see ShardIndex) and indexing continues at the next valid header."""
    idx = ShardIndex(path)
    cut_key = None  # key of the member cut by the end of the file, when its header was readable
    with open(path, "rb") as f:
        fsize = os.fstat(f.fileno()).st_size
        pos, ended = 0, False
        meta: dict[str, object] = {}  # pending long name / pax path and size for the next member
        skip_next = None  # (offset, detail) of a malformed metadata header: skip the member it describes
        while pos + 512 <= fsize:
            f.seek(pos)
            block = f.read(512)
            try:
                hdr = _parse_header(block)
            except _BadHeader as e:
                nxt = _after_damage(f, idx, pos, fsize, block, e)
                meta, skip_next = {}, None
                if nxt is None:
                    break  # nothing readable after the damage: no end-of-archive either
                pos = nxt
                continue
            if hdr is None:
                ended = True
                break
            name, size, kind = hdr
            if kind in (b"0", b"\0", b"7") and "size" in meta:
                size = meta["size"]
            data = pos + 512
            if data + size > fsize:  # member cut by the end of the file
                split = _split_name(meta.get("path", name))
                cut_key = split[0] if split and skip_next is None else None
                break
            pos = data + (size + 511) // 512 * 512
            if kind in (b"L", b"K", b"x", b"X", b"g"):  # long name / long link / pax headers
                if kind in (b"K", b"g"):
                    continue  # link targets and global pax headers name no member we read
                try:
                    _read_meta(f, kind, data, size, meta)
                except _BadHeader as e:
                    skip_next = (data - 512, str(e))
                continue
            name = meta.get("path", name)
            meta = {}
            if skip_next is not None:  # the member a malformed metadata header describes: not trusted
                idx.damaged.append((skip_next[0], pos - skip_next[0], "bad_pax_header", f"{skip_next[1]} (member {name!r})"))
                skip_next = None
                continue
            _add_member(idx, name, kind, data, size)
    return _mark_truncated(idx, ended, cut_key)


def _warn_damage(idx: ShardIndex) -> None:
    for off, n, reason, detail in idx.damaged[:5]:
        log.warning("shards: %r: %s at offset %d (%s); skipped %d bytes", idx.path, reason, off, detail, n)
    if len(idx.damaged) > 5:
        log.warning("shards: %r: %d more damaged regions", idx.path, len(idx.damaged) - 5)


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
                idx = ShardIndex(path, d["keys"], [{k: tuple(v) for k, v in comp.items()} for comp in d["components"]],
                                 d["truncated"], d["dropped"], [tuple(x) for x in d["damaged"]])
                _warn_damage(idx)
                return idx
        except (OSError, ValueError, KeyError):
            continue
    idx = index_shard(path)
    _warn_damage(idx)
    blob = json.dumps({"stamp": stamp, "keys": idx.keys, "components": idx.components,
                       "truncated": idx.truncated, "dropped": idx.dropped, "damaged": idx.damaged})
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
