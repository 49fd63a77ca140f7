"""Load and save AIMv2 encoder weights in the three released key layouts (method.md §7).

Our module names are Apple's ml-aim names, so `AIMv2Encoder.state_dict()` *is* the ml-aim format.
The other two layouts map onto it key by key (b = block index, D = width, N = (S / p)^2):

    ml-aim (canonical)                      transformers Aimv2VisionModel              timm
    preprocessor.patchifier.proj.{w,b}      embeddings.patch_embed.{w,b}               patch_embed.proj.{w,b}
    preprocessor.patchifier.norm.weight     embeddings.rms_norm.weight                 patch_embed.norm.weight
    preprocessor.pos_embed       (1, N, D)  embeddings.position_embedding.weight (N,D) pos_embed (1, N, D)
    trunk.blocks.b.norm_1 / norm_2          encoder.layers.b.rms_norm1 / rms_norm2     blocks.b.norm1 / norm2
    trunk.blocks.b.attn.qkv.weight (3D, D)  encoder.layers.b.attention.{q,k,v}_proj    blocks.b.attn.qkv
    trunk.blocks.b.attn.proj.weight         encoder.layers.b.attention.out_proj        blocks.b.attn.proj
    trunk.blocks.b.mlp.fc1 / fc3 / fc2      encoder.layers.b.ffn.gate_proj/up_proj/down_proj  blocks.b.mlp.fc1_g/fc1_x/fc2
    trunk.post_trunk_norm.weight            rms_norm.weight                            norm.weight

qkv is the row-wise concatenation [q; k; v] (each (D, D)); SwiGLU is fc2(silu(fc1 x) * fc3 x), so
fc1 = gate_proj = fc1_g and fc3 = up_proj = fc1_x. Any key prefix (`vision_model.` of transformers'
Aimv2Model, `image_encoder.` of Apple's LiT checkpoints, `encoder.` of our pretrainer, `module.`,
`_orig_mod.`) is found from the patch-embedding key; keys outside it (text tower, decoder) are dropped.
Attention-pooling heads (`head.*`) are dropped too: the encoder is the trunk only.

transformers (5.x modeling_aimv2): position_embedding is an nn.Embedding looked up at arange(N), i.e.
the same (N, D) table added after the patch RMSNorm; blocks are pre-norm; `rms_norm` is the final
norm; last_hidden_state equals our encoder output. Its `is_native` models have no learned table
but a fixed 2-D sin-cos one (`sincos_pos_embed`), which we rebuild for any resolution; with
`native=True` they load as our native encoder (no table, sin-cos per image grid, method.md §8).

    enc = load_encoder("aimv2-large-patch14-224/")              # HF layout dir, any of the 3 formats
    enc = load_encoder(sd, "aimv2-large", img_size=448)          # pos-embed bicubic-resized 16x16 -> 32x32
    save_encoder(enc, "out/", format="hf")                       # transformers.Aimv2VisionModel reads it
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from pathlib import Path

import torch

from aimv2.config import ModelConfig
from aimv2.pos_embed import resize_table, sincos_2d
from aimv2.presets import PRESETS, get_preset

log = logging.getLogger(__name__)

FORMATS = ("ml-aim", "hf", "timm")
POS = "preprocessor.pos_embed"
PROJ = "preprocessor.patchifier.proj.weight"
_ANCHORS = {"ml-aim": PROJ, "hf": "embeddings.patch_embed.weight", "timm": "patch_embed.proj.weight"}
_CONFIG_KEY = "aimv2_config"          # safetensors metadata: json of ModelConfig.to_dict()

# (ml-aim, other) key templates; "{b}" is a block index. qkv of "hf" is split / joined separately.
_KEYMAP = {
    "hf": [
        ("preprocessor.patchifier.proj.weight", "embeddings.patch_embed.weight"),
        ("preprocessor.patchifier.proj.bias", "embeddings.patch_embed.bias"),
        ("preprocessor.patchifier.norm.weight", "embeddings.rms_norm.weight"),
        (POS, "embeddings.position_embedding.weight"),
        ("trunk.blocks.{b}.norm_1.weight", "encoder.layers.{b}.rms_norm1.weight"),
        ("trunk.blocks.{b}.norm_2.weight", "encoder.layers.{b}.rms_norm2.weight"),
        ("trunk.blocks.{b}.attn.proj.weight", "encoder.layers.{b}.attention.out_proj.weight"),
        ("trunk.blocks.{b}.mlp.fc1.weight", "encoder.layers.{b}.ffn.gate_proj.weight"),
        ("trunk.blocks.{b}.mlp.fc3.weight", "encoder.layers.{b}.ffn.up_proj.weight"),
        ("trunk.blocks.{b}.mlp.fc2.weight", "encoder.layers.{b}.ffn.down_proj.weight"),
        ("trunk.post_trunk_norm.weight", "rms_norm.weight"),
    ],
    "timm": [
        ("preprocessor.patchifier.proj.weight", "patch_embed.proj.weight"),
        ("preprocessor.patchifier.proj.bias", "patch_embed.proj.bias"),
        ("preprocessor.patchifier.norm.weight", "patch_embed.norm.weight"),
        (POS, "pos_embed"),
        ("trunk.blocks.{b}.norm_1.weight", "blocks.{b}.norm1.weight"),
        ("trunk.blocks.{b}.norm_2.weight", "blocks.{b}.norm2.weight"),
        ("trunk.blocks.{b}.attn.qkv.weight", "blocks.{b}.attn.qkv.weight"),
        ("trunk.blocks.{b}.attn.proj.weight", "blocks.{b}.attn.proj.weight"),
        ("trunk.blocks.{b}.mlp.fc1.weight", "blocks.{b}.mlp.fc1_g.weight"),
        ("trunk.blocks.{b}.mlp.fc3.weight", "blocks.{b}.mlp.fc1_x.weight"),
        ("trunk.blocks.{b}.mlp.fc2.weight", "blocks.{b}.mlp.fc2.weight"),
        ("trunk.post_trunk_norm.weight", "norm.weight"),
    ],
}
_HF_QKV = re.compile(r"^encoder\.layers\.(\d+)\.attention\.([qkv])_proj\.weight$")
_MLAIM_QKV = re.compile(r"^trunk\.blocks\.(\d+)\.attn\.qkv\.weight$")


def _template_re(t: str) -> re.Pattern:
    return re.compile("^" + re.escape(t).replace(re.escape("{b}"), r"(?P<b>\d+)") + "$")


_RULES = {fmt: [(_template_re(a), a, _template_re(o), o) for a, o in pairs] for fmt, pairs in _KEYMAP.items()}


def _rename(key: str, fmt: str, to_mlaim: bool) -> str:
    for ra, ta, ro, to in _RULES[fmt]:
        m = (ro if to_mlaim else ra).match(key)
        if m:
            return (ta if to_mlaim else to).replace("{b}", m.groupdict().get("b") or "")
    return key                                   # unknown keys pass through (reported at load)


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"format: expected one of {FORMATS}, got {fmt!r}")


# ----------------------------------------------------------------------------- format conversion
def _find_layout(sd: dict) -> tuple[str, str]:
    """(format, key prefix) from the patch-embedding weight key."""
    found = set()
    for k in sd:
        for fmt, anchor in _ANCHORS.items():
            if k == anchor or k.endswith("." + anchor):
                found.add((fmt, k[: len(k) - len(anchor)]))
    if not found:
        sample = sorted(sd)[:8]
        raise ValueError("state dict: no AIMv2 patch-embedding key found (expected one of "
                         f"{sorted(_ANCHORS.values())}, possibly prefixed); first keys: {sample}")
    if len(found) > 1:
        raise ValueError(f"state dict: several encoders found ((format, prefix) = {sorted(found)}); "
                         "pass the sub-dict of the one to load")
    return found.pop()


def detect_format(state_dict: dict) -> str:
    """'ml-aim' | 'hf' | 'timm' (method.md §7), whatever prefix the keys carry."""
    return _find_layout(state_dict)[0]


def to_mlaim(state_dict: dict, fmt: str) -> dict:
    """Unprefixed `fmt` keys -> ml-aim keys (= AIMv2Encoder.state_dict() names). hf q/k/v_proj are
    stacked into qkv (3D, D); the hf position embedding (N, D) becomes (1, N, D). Unknown keys, and
    q/k/v of a block that lacks one of the three, are returned unchanged."""
    _check_fmt(fmt)
    if fmt == "ml-aim":
        return dict(state_dict)
    out, qkv = {}, {}
    for k, v in state_dict.items():
        m = _HF_QKV.match(k) if fmt == "hf" else None
        if m:
            qkv.setdefault(int(m[1]), {})[m[2]] = (k, v)
            continue
        nk = _rename(k, fmt, to_mlaim=True)
        out[nk] = v[None] if nk == POS and v.dim() == 2 else v              # (N, D) -> (1, N, D)
    for b, parts in sorted(qkv.items()):
        if len(parts) == 3:
            out[f"trunk.blocks.{b}.attn.qkv.weight"] = torch.cat([parts[c][1] for c in "qkv"], 0)  # (3D, D)
        else:
            out.update(dict(parts.values()))
    return out


def from_mlaim(state_dict: dict, fmt: str) -> dict:
    """ml-aim keys -> `fmt` keys (the inverse of `to_mlaim`); split tensors are fresh copies."""
    _check_fmt(fmt)
    if fmt == "ml-aim":
        return dict(state_dict)
    out = {}
    for k, v in state_dict.items():
        m = _MLAIM_QKV.match(k) if fmt == "hf" else None
        if m:
            for c, t in zip("qkv", v.chunk(3, dim=0)):                         # 3 x (D, D)
                out[f"encoder.layers.{m[1]}.attention.{c}_proj.weight"] = t.clone()
            continue
        nk = _rename(k, fmt, to_mlaim=False)
        out[nk] = v.reshape(v.shape[-2:]).clone() if k == POS and fmt == "hf" else v  # (1, N, D) -> (N, D)
    return out


def _canonical(sd: dict) -> tuple[dict, str, str]:
    """Strip the prefix, drop foreign and head keys, convert to ml-aim: (sd, format, prefix)."""
    fmt, prefix = _find_layout(sd)
    keep, dropped = {}, set()
    for k, v in sd.items():
        rest = k[len(prefix):] if k.startswith(prefix) else None
        if rest is None or rest.startswith("head.") or rest.endswith("position_ids"):
            dropped.add(k.rsplit(".", 1)[0] if rest is None else prefix + rest.split(".")[0])
        else:
            keep[rest] = v
    if dropped:
        log.info("weights: ignoring %d key groups outside the encoder trunk: %s", len(dropped),
                 sorted(dropped)[:10])
    return to_mlaim(keep, fmt), fmt, prefix


# ----------------------------------------------------------------------------- position embedding
def interpolate_pos_embed(pe: torch.Tensor, new_grid: int) -> torch.Tensor:
    """Resize a learned position embedding over its square 2-D patch grid.

    pe (1, g*g, D) or (g*g, D), tokens in row-major order (row = image y) -> same rank with G*G
    tokens, G = new_grid. Bicubic interpolation (PyTorch's cubic convolution, a = -0.75,
    align_corners=False, antialiased when shrinking) of the (D, g, g) image, computed in fp32 and
    returned in pe's dtype. G == g returns an unchanged copy.
    """
    if not isinstance(pe, torch.Tensor) or pe.dim() not in (2, 3) or (pe.dim() == 3 and pe.shape[0] != 1):
        raise ValueError(f"pe: expected a (1, N, D) or (N, D) tensor, got {getattr(pe, 'shape', type(pe))}")
    if not isinstance(new_grid, int) or new_grid <= 0:
        raise ValueError(f"new_grid: expected a positive int, got {new_grid!r}")
    out = resize_table(pe, new_grid)              # the native encoder's per-grid resize (method.md §8)
    return pe.clone() if out is pe else out


def sincos_pos_embed(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos embedding of the `-native` AIMv2 checkpoints (transformers' is_native) on a
    square grid: token (y, x) -> [sin(x w) | cos(x w) | sin(y w) | cos(y w)], w_i = 10000^(-i / (D/4))
    (`aimv2.pos_embed.sincos_2d`, which takes any h x w grid). Returns (1, grid*grid, dim) fp32."""
    if dim % 4:
        raise ValueError(f"dim: the sin-cos embedding needs a multiple of 4, got {dim}")
    return sincos_2d(grid, grid, dim)[None]                                        # (1, g*g, D)


# ----------------------------------------------------------------------------- configs
def _vision_fields(cfg: dict | None) -> dict:
    """Normalise a config.json (transformers Aimv2VisionConfig / Aimv2Config, Apple's hub config, or
    a timm config with model_args) to transformers vision field names."""
    if not cfg:
        return {}
    cfg = dict(cfg.get("vision_config") or cfg)
    args = cfg.get("model_args") or {}
    for theirs, ours in (("embed_dim", "hidden_size"), ("depth", "num_hidden_layers"),
                         ("num_heads", "num_attention_heads"), ("img_size", "image_size"),
                         ("patch_size", "patch_size")):
        if theirs in args:
            cfg.setdefault(ours, args[theirs])
    for f in ("image_size", "patch_size"):
        if isinstance(cfg.get(f), (list, tuple)):
            cfg[f] = int(cfg[f][0])
    return cfg


def _shape_summary(sd: dict) -> dict:
    """Architecture read from tensor shapes alone (ml-aim keys); absent entries are None."""
    proj, pos = sd.get(PROJ), sd.get(POS)
    fc1 = sd.get("trunk.blocks.0.mlp.fc1.weight")
    blocks = {int(m[1]) for k in sd if (m := re.match(r"^trunk\.blocks\.(\d+)\.", k))}
    out = dict(dim=None, in_chans=None, patch_size=None, depth=len(blocks) or None,
               mlp_hidden=None if fc1 is None else fc1.shape[0], grid=None)
    if proj is not None and proj.dim() == 4:
        out.update(dim=proj.shape[0], in_chans=proj.shape[1], patch_size=proj.shape[2])
    if pos is not None:
        g = math.isqrt(pos.shape[-2])
        out["grid"] = g if g * g == pos.shape[-2] else None
    return out


def _preset_name(cfg: ModelConfig) -> str:
    arch = ("dim", "depth", "num_heads", "mlp_hidden", "patch_size", "in_chans")
    for name, p in PRESETS.items():
        if all(getattr(p, a) == getattr(cfg, a) for a in arch):
            return name
    return "custom"


def infer_config(state_dict: dict, hf_config: dict | None = None) -> ModelConfig:
    """The encoder config of a checkpoint (any of the three formats, any prefix).

    Width D, depth, MLP hidden, patch size and channels come from tensor shapes; the image size from
    the position embedding (N = (S / p)^2) or, without one (sin-cos `-native` models), from the
    config's image_size. Heads and eps come from `hf_config` (a config.json dict) when given, else
    head dim 128 (heads = D / 128, method.md §1) and eps 1e-5. Decoder fields are the matching preset's."""
    sd = _canonical(state_dict)[0]
    hf = _vision_fields(hf_config)
    s = _shape_summary(sd)
    if s["dim"] is None or s["depth"] is None or s["mlp_hidden"] is None:
        raise ValueError(f"infer_config: cannot read the architecture from the keys (found {s}); "
                         f"need {PROJ}, trunk.blocks.0.mlp.fc1.weight and trunk.blocks.*")
    D, p = s["dim"], s["patch_size"]
    if s["grid"] is not None:
        img = s["grid"] * p
    elif POS in sd:
        raise ValueError(f"infer_config: {POS} of shape {tuple(sd[POS].shape)} is not a square grid")
    elif "image_size" in hf:
        img = int(hf["image_size"])
    else:
        raise ValueError(f"infer_config: no {POS} and no image_size in the config; pass img_size")
    if "num_attention_heads" in hf:
        heads = int(hf["num_attention_heads"])
    elif D % 128 == 0:
        heads = D // 128
    else:
        raise ValueError(f"infer_config: width {D} is not a multiple of the head dim 128 and the "
                         "checkpoint states no head count; pass num_heads=... or a preset")
    fields = dict(img_size=img, patch_size=p, in_chans=s["in_chans"], dim=D, depth=s["depth"],
                  num_heads=heads, mlp_hidden=s["mlp_hidden"],
                  norm_eps=float(hf.get("rms_norm_eps", ModelConfig.norm_eps)))
    name = _preset_name(ModelConfig(**fields))
    if name != "custom":
        return get_preset(name, **fields)
    return ModelConfig(name="custom", **fields).validate()


def _config_from_metadata(meta: dict | None) -> ModelConfig | None:
    if not meta or _CONFIG_KEY not in meta:
        return None
    d = json.loads(meta[_CONFIG_KEY])
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    if set(d) - known:
        log.warning("weights: ignoring unknown config fields %s in checkpoint metadata", sorted(set(d) - known))
    return ModelConfig.from_dict({k: v for k, v in d.items() if k in known})


# ----------------------------------------------------------------------------- reading sources
def _read_safetensors(path: Path) -> tuple[dict, dict]:
    from safetensors import safe_open
    sd = {}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
        for k in f.keys():
            sd[k] = f.get_tensor(k)
    return sd, meta


def _read_torch(path: Path) -> dict:
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("model", "state_dict", "model_state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not torch.is_tensor(obj.get(key)):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise ValueError(f"source {path}: expected a state dict, got {type(obj).__name__}")
    return obj


def _read_file(path: Path) -> tuple[dict, dict]:
    if path.name.endswith(".index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        sd, meta = {}, {}
        for shard in dict.fromkeys(weight_map.values()):                 # unique, in order
            part, m = _read_file(path.parent / shard)
            sd.update(part)
            meta = meta or m
        return sd, meta
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        return _read_torch(path), {}
    raise ValueError(f"source {path}: expected .safetensors, .bin, .pt, .pth or *.index.json")


_WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")


def _is_whole(ckpt_dir: Path) -> bool:
    """A checkpoint dir whose model.safetensors header opens (a half-written file does not)."""
    if ckpt_dir.name.startswith(".") or ckpt_dir.name.endswith((".tmp", ".partial", ".incomplete")):
        return False
    try:
        from safetensors import safe_open
        with safe_open(str(ckpt_dir / "model.safetensors"), framework="pt") as f:
            f.keys()
        return True
    except Exception:                                       # missing or truncated: not whole
        return False


def latest_checkpoint(run_dir: str | os.PathLike) -> Path:
    """The newest whole `<run_dir>/checkpoints/*/` (largest step number in the name, then mtime)."""
    cands = [d for d in sorted(Path(run_dir, "checkpoints").glob("*")) if d.is_dir() and _is_whole(d)]
    if not cands:
        raise ValueError(f"source {run_dir}: no whole checkpoint under checkpoints/*/model.safetensors")

    def order(d: Path):
        nums = re.findall(r"\d+", d.name)
        return (int(nums[-1]) if nums else -1, (d / "model.safetensors").stat().st_mtime)
    return max(cands, key=order)


def _read_source(source) -> tuple[dict, dict, dict | None, str, bool]:
    """-> (state dict, safetensors metadata, config.json dict or None, description, owns tensors)."""
    if isinstance(source, dict):
        sd = source
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(sd.get(key), dict):
                sd = sd[key]
        return dict(sd), {}, None, "state dict", False
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source: expected a path or a state dict, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source: {path} does not exist")
    if path.is_dir():
        if not any((path / n).exists() for n in _WEIGHT_NAMES + ("config.json",)) \
                and (path / "checkpoints").is_dir():
            path = latest_checkpoint(path)
            log.info("weights: loading the newest checkpoint %s", path)
        weights = next((path / n for n in _WEIGHT_NAMES if (path / n).exists()), None)
        if weights is None:
            sts = sorted(path.glob("*.safetensors"))
            if len(sts) != 1:
                raise ValueError(f"source {path}: no weights found (looked for {_WEIGHT_NAMES} or a "
                                 f"single *.safetensors; found {[p.name for p in sts]})")
            weights = sts[0]
        cfg_path = path / "config.json"
    else:
        weights, cfg_path = path, path.parent / "config.json"
        if path.name not in _WEIGHT_NAMES:
            cfg_path = None                            # a loose file: its neighbours are not its config
    sd, meta = _read_file(weights)
    hf_cfg = json.loads(cfg_path.read_text()) if cfg_path is not None and cfg_path.exists() else None
    return sd, meta, hf_cfg, str(weights), True


# ----------------------------------------------------------------------------- load
def _resolve_config(sd, meta, hf, preset, overrides, origin) -> tuple[ModelConfig, int, bool]:
    """-> (config at the checkpoint's own resolution, that resolution, native sin-cos model?)."""
    if "num_heads" in overrides:                        # an explicit head count beats D / 128
        hf["num_attention_heads"] = overrides["num_heads"]
    if hf.get("qkv_bias") or hf.get("mlp_bias"):
        raise ValueError(f"load_encoder({origin}): checkpoints with qkv / MLP biases are not AIMv2 "
                         "encoders (method.md §1 has none)")
    ckpt_cfg = _config_from_metadata(meta)
    if ckpt_cfg is None and preset is None:
        ckpt_cfg = infer_config(sd, hf)
    if preset is None:
        cfg = ckpt_cfg
    else:
        cfg = get_preset(preset) if isinstance(preset, str) else preset
        if not isinstance(cfg, ModelConfig):
            raise TypeError(f"preset: expected a preset name or a ModelConfig, got {type(preset).__name__}")
        stated = ckpt_cfg.num_heads if ckpt_cfg is not None else hf.get("num_attention_heads")
        if stated is not None and "num_heads" not in overrides and int(stated) != cfg.num_heads:
            raise ValueError(f"load_encoder({origin}): the checkpoint states {stated} heads, preset "
                             f"{cfg.name!r} has {cfg.num_heads}; pass num_heads=... to override")
    native = POS not in sd and (bool(hf.get("is_native")) or (
        ckpt_cfg is not None and ckpt_cfg.native and ckpt_cfg.native_pos == "sincos"))
    grid = _shape_summary(sd)["grid"]
    img = grid * cfg.patch_size if grid else int(hf.get("image_size", cfg.img_size)) if native else cfg.img_size
    return cfg.replace(img_size=img, **overrides), img, native


def _check_keys(sd, expected, strict, what) -> list[str]:
    """Raise ValueError listing missing / unexpected / mis-shaped keys; returns the missing ones."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {expected[k]}"
                       for k in set(sd) & set(expected) if tuple(sd[k].shape) != expected[k])
    if misshaped or (strict and (missing or unexpected)):
        msg = what(bool(misshaped))
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("mis-shaped keys", misshaped)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... and {len(items) - 20} more" if len(items) > 20 else "")
                msg += f"\n  {title} ({len(items)}): {shown}"
        raise ValueError(msg)
    return missing


def _arch(d: dict) -> str:
    return ", ".join(f"{k} {d[k]}" for k in ("dim", "depth", "mlp_hidden", "patch_size") if d.get(k) is not None)


def _native_position(sd: dict, cfg: ModelConfig, native: bool, ckpt_img: int, cfg_overrides: dict,
                     origin: str) -> ModelConfig:
    """The position code of the model to build, `sd` adjusted to it: a native model (per-image grids,
    method.md §8) keeps a learned table (resized per grid) unless native_pos="sincos" is asked for, and
    a sin-cos `-native` checkpoint (`native`) loaded at a fixed size gets its table computed."""
    if cfg.native:
        if native and cfg.native_pos == "interpolate":
            raise ValueError(f"load_encoder({origin}): native_pos='interpolate' resizes a learned table, and "
                             "this sin-cos `-native` checkpoint has none; use native_pos='sincos' (the default)")
        if POS in sd and cfg.native_pos == "sincos":
            if cfg_overrides.get("native_pos") == "sincos":
                log.warning("load_encoder(%s): native_pos='sincos' drops the checkpoint's learned position "
                            "table; features change until the model is fine-tuned", origin)
                del sd[POS]
            else:                                       # keep the learned table, resized per image grid
                cfg = cfg.replace(native_pos="interpolate")
    elif native:
        sd[POS] = sincos_pos_embed(ckpt_img // cfg.patch_size, cfg.dim)
    return cfg


def _misfit_message(sd: dict, cfg: ModelConfig, preset, fmt: str, prefix: str, origin: str):
    """what(misshaped) for _check_keys: the first line of load_encoder's error, naming the checkpoint's
    own size (and the preset of that size) when the shapes do not fit a preset asked for."""
    def what(misshaped: bool) -> str:
        msg = (f"load_encoder({origin}): {fmt} checkpoint (key prefix {prefix!r}) does not fit "
               f"{cfg.name} ({_arch(dataclasses.asdict(cfg))})")
        if preset is not None and misshaped:
            s = _shape_summary(sd)
            other = [n for n, c in PRESETS.items()
                     if all(getattr(c, a) == s[a] for a in ("dim", "depth", "mlp_hidden", "patch_size"))]
            msg += f"; the checkpoint is of another size ({_arch(s)}{', preset ' + other[0] if other else ''})"
        return msg
    return what


def load_encoder(source, preset=None, *, img_size: int | None = None, strict: bool = True,
                 **cfg_overrides):
    """Build an AIMv2Encoder from released or our own weights; eval mode, CPU, fp32.

    source: a .safetensors / .bin / .pt file, a Hugging Face layout directory (config.json +
      model.safetensors | pytorch_model.bin, sharded *.index.json included), a state dict, one of
      our training checkpoints (a dir or model.safetensors with `encoder.` / `decoder.` keys and
      the `aimv2_config` safetensors metadata; only `encoder.*` is used), or a training run dir
      (the newest whole `checkpoints/*/model.safetensors`). Key format (ml-aim, transformers,
      timm) and prefix are detected.
    preset: None (size from the metadata config, else config.json, else tensor shapes: heads = D/128
      unless stated), a preset name or a ModelConfig. A checkpoint of another size raises ValueError.
    img_size: None keeps the checkpoint's resolution. Another size resizes the learned position
      embedding by bicubic interpolation over its 2-D grid (`interpolate_pos_embed`, e.g.
      16x16 -> 32x32 tokens for 224 -> 448 px); sin-cos `-native` models get their exact embedding.
    strict: False tolerates missing keys (left at init) and unexpected keys; never mis-shaped ones.
    cfg_overrides: ModelConfig fields for the built model (attn_backend="flex", impl="triton", ...).
      native=True builds the native-resolution encoder (method.md §8; images of any size,
      `forward_packed`): a sin-cos `-native` checkpoint (transformers is_native) maps onto it with no
      position table; a learned-table checkpoint keeps its table and resizes it bicubically to each
      image's grid (native_pos="interpolate", chosen automatically; native_pos="sincos" drops the table
      instead, with a warning).
    Raises ValueError listing missing, unexpected and mis-shaped keys.
    """
    from aimv2.model import AIMv2Encoder
    raw, meta, hf_cfg, origin, owned = _read_source(source)
    sd, fmt, prefix = _canonical(raw)
    del raw
    cfg, ckpt_img, native = _resolve_config(sd, meta, _vision_fields(hf_cfg), preset, cfg_overrides, origin)
    p = cfg.patch_size
    target = ckpt_img if img_size is None else img_size
    if not isinstance(target, int) or target <= 0 or target % p:
        raise ValueError(f"img_size: expected a positive multiple of the patch size {p}, got {img_size!r}")
    cfg = _native_position(sd, cfg, native, ckpt_img, cfg_overrides, origin)

    # ---- key sets and shapes against the model at the checkpoint's own resolution
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in AIMv2Encoder(cfg).state_dict().items()}
    missing = _check_keys(sd, expected, strict, _misfit_message(sd, cfg, preset, fmt, prefix, origin))

    # ---- resolution change, fp32, build (on meta + assign: no init, no second copy)
    if target != ckpt_img and POS in sd:
        sd[POS] = sincos_pos_embed(target // p, cfg.dim) if native else interpolate_pos_embed(sd[POS], target // p)
    # tensors of a caller's state dict are always copied, never aliased
    sd = {k: v.detach().to(torch.float32, copy=not owned).contiguous() for k, v in sd.items() if k in expected}
    cfg = cfg.replace(img_size=target)
    if missing:                                         # strict=False: real init for what is absent
        model = AIMv2Encoder(cfg)
        model.load_state_dict(sd, strict=False)
    else:
        with torch.device("meta"):
            model = AIMv2Encoder(cfg)
        model.load_state_dict(sd, strict=True, assign=True)
    return model.eval()


# ----------------------------------------------------------------------------- save
_TIMM_NAMES = {"aimv2-large": "aimv2_large", "aimv2-huge": "aimv2_huge", "aimv2-1b": "aimv2_1b",
               "aimv2-3b": "aimv2_3b"}


def _hf_config(cfg: ModelConfig, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["Aimv2VisionModel"], "model_type": "aimv2_vision_model",
        "hidden_size": cfg.dim, "intermediate_size": cfg.mlp_hidden,
        "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.num_heads,
        "num_channels": cfg.in_chans, "image_size": cfg.img_size, "patch_size": cfg.patch_size,
        "hidden_act": "silu", "attention_dropout": 0.0, "rms_norm_eps": cfg.norm_eps,
        "qkv_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "use_head": False, "is_native": cfg.native and cfg.native_pos == "sincos",
        "dtype": str(dtype).removeprefix("torch."),
    }


def save_encoder(encoder, path, format: str = "hf") -> Path:
    """Write an encoder's weights as safetensors in the `format` key layout; returns the weights file.

    "hf": a directory with config.json (transformers Aimv2VisionConfig, model_type
      aimv2_vision_model, use_head false) + model.safetensors, so that
      `transformers.Aimv2VisionModel.from_pretrained(path)` reads it.
    "ml-aim" / "timm": `path` ending in .safetensors is written as that file; any other path is a
      directory with model.safetensors + config.json (the same vision fields; timm's model_args).
    Every file carries the `aimv2_config` metadata, so `load_encoder` restores the exact config.
    A pretrainer (anything with an `.encoder`) saves its encoder.
    """
    from safetensors.torch import save_file

    from aimv2.model import AIMv2Encoder
    _check_fmt(format)
    if not isinstance(encoder, AIMv2Encoder) and isinstance(getattr(encoder, "encoder", None), AIMv2Encoder):
        encoder = encoder.encoder
    if not isinstance(encoder, AIMv2Encoder):
        raise TypeError(f"encoder: expected an AIMv2Encoder, got {type(encoder).__name__}")
    cfg, path = encoder.cfg, Path(path)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    sd = {k: v.contiguous() for k, v in from_mlaim(sd, format).items()}
    dtype = sd[_ANCHORS[format]].dtype
    meta = {"format": "pt", _CONFIG_KEY: json.dumps(cfg.to_dict())}
    if path.suffix == ".safetensors":
        if format == "hf":
            raise ValueError(f"path: format 'hf' writes a directory (config.json + model.safetensors), got {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(sd, str(path), metadata=meta)
        return path
    path.mkdir(parents=True, exist_ok=True)
    conf = _hf_config(cfg, dtype)
    if format != "hf":                                  # not a transformers model: no model_type
        conf = {k: v for k, v in conf.items() if k not in ("architectures", "model_type")}
        conf["aimv2_format"] = format
    if format == "timm":
        name = _preset_name(cfg)
        if name in _TIMM_NAMES:
            conf["architecture"] = f"{_TIMM_NAMES[name]}_patch{cfg.patch_size}_{cfg.img_size}"
        conf.update(num_classes=0, num_features=cfg.dim, global_pool="avg",
                    model_args=dict(img_size=cfg.img_size, patch_size=cfg.patch_size, embed_dim=cfg.dim,
                                    depth=cfg.depth, num_heads=cfg.num_heads, class_token=False))
    (path / "config.json").write_text(json.dumps(conf, indent=2) + "\n")
    save_file(sd, str(path / "model.safetensors"), metadata=meta)
    return path / "model.safetensors"
