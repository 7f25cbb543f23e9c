"""The mask-bank file format: safetensors (never pickle) with a format version, the pruning rule,
a sha256 per tensor and one over the metadata; the compact layout stores a per-bit majority base
mask plus one XOR delta per pair, compressed (zstd or lzma).

Works on plain data (shapes, alpha, rule, ``{pair: {name: int32 bits}}``): :class:`MaskBank`
(:mod:`lass_sparse.masks`) calls :func:`write_bank` and :func:`read_bank`. Error messages name
``MaskBank.save`` / ``MaskBank.load``, the entry points users call.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import lzma
import math
import os
import re
import sys
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .bitmask import num_words
from .fileio import atomic_write
from .ops import pack_mask, unpack_mask

FORMAT = "lass_sparse.maskbank"
FORMAT_VERSION = 2  # 2: the metadata is checksummed too ("meta_sha256")
READ_VERSIONS = (1, 2)
_SEP = "::"  # tensor key = pair + _SEP + parameter name
_META_KEYS = frozenset({"format", "format_version", "layout", "alpha", "rule", "shapes", "pairs",
                        "sha256"})
_CODECS = ("zstd", "lzma")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")

Masks = Mapping[str, Mapping[str, Tensor]]  # pair -> parameter name -> int32 packed bits


class MaskFileError(ValueError):
    """A mask-bank file that is malformed, corrupted or edited (names the file and the field)."""


def _sha256(t: Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _bits_shape(shape: Sequence[int]) -> tuple[int, ...]:
    return (*shape[:-1], num_words(shape[-1]))


def _metadata(shapes: Mapping[str, Sequence[int]], alpha: float | None, rule: str,
              pairs: Sequence[str], layout: str) -> dict[str, str]:
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0):
        raise ValueError(f"MaskBank.save: alpha must be None or a number in [0, 1], got "
                         f"{alpha!r}")
    return {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "layout": layout,
        "alpha": json.dumps(alpha),
        "rule": rule,
        "shapes": json.dumps({n: list(s) for n, s in shapes.items()}),
        "pairs": json.dumps(list(pairs)),
    }


def write_bank(
    path: str,
    shapes: Mapping[str, Sequence[int]],
    alpha: float | None,
    rule: str,
    masks: Masks,
    *,
    compact: bool = False,
    codec: str = "auto",
) -> int:
    """Write ``masks`` (``{pair: {name: bits}}``, every pair covering ``shapes``) to ``path``
    atomically; returns the file size in bytes. See :meth:`MaskBank.save`."""
    from safetensors.torch import save

    if compact:
        tensors, meta = _compact(shapes, alpha, rule, masks, codec)
    else:
        tensors = {f"{p}{_SEP}{n}": b.detach().cpu().clone()  # own storage (no stack views)
                   for p, m in masks.items() for n, b in m.items()}
        meta = _metadata(shapes, alpha, rule, list(masks), "plain")
    meta["sha256"] = json.dumps({
        f"{p}{_SEP}{n}": _sha256(b) for p, m in masks.items() for n, b in m.items()
    })
    meta["meta_sha256"] = _meta_digest(meta)
    data = save(tensors, metadata=meta)
    atomic_write(path, data)
    return len(data)


def _compact(shapes: Mapping[str, Sequence[int]], alpha: float | None, rule: str, masks: Masks,
             codec: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    codec = _pick_codec(codec)
    pairs = list(masks)
    chunks = []
    for n in shapes if pairs else ():
        stacked = torch.stack([masks[p][n] for p in pairs]).cpu()
        base = _majority(stacked, shapes[n][-1])
        chunks.append(base.numpy().tobytes())
        for i in range(len(pairs)):
            chunks.append((stacked[i] ^ base).numpy().tobytes())
    blob = _compress(b"".join(chunks), codec)
    meta = _metadata(shapes, alpha, rule, pairs, "compact")
    meta["codec"] = codec
    tensors = {"__compact__": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
    return tensors, meta


def read_bank(path: str) -> tuple[dict, dict[str, dict[str, Tensor]]]:
    """Read and fully validate a file written by :func:`write_bank`: returns the parsed metadata
    (``layout``, ``codec``, ``alpha``, ``rule``, ``shapes``, ``pairs``, ``sha256``) and
    ``{pair: {name: int32 bits}}`` (CPU). Every metadata field is validated and (format version
    2) checksummed before any tensor is read or decompressed; a compact blob is decompressed only
    up to the size the shapes imply; each tensor's dtype, shape and checksum are checked (its
    padding bits by ``MaskBank.add_pair``, as for any bank). Raises :class:`MaskFileError`
    naming the file and the field or tensor."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(errno.ENOENT, "no such mask bank file", path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            spec = _parse_metadata(meta, list(f.keys()), path)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (MaskFileError, OSError):
        raise
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise MaskFileError(
            f"MaskBank.load: {path} is not a readable safetensors file: {e}") from None
    shapes, pairs, sums = spec["shapes"], spec["pairs"], spec["sha256"]
    if spec["layout"] == "compact":
        blob = tensors["__compact__"]
        if blob.dtype != torch.uint8 or blob.dim() != 1:
            raise MaskFileError(f"MaskBank.load: {path}: tensor '__compact__' is "
                                f"{blob.dtype}{list(blob.shape)}, expected a uint8 vector")
        tensors = _decompact(blob, shapes, pairs, spec["codec"], path)
    out: dict[str, dict[str, Tensor]] = {}
    for p in pairs:
        masks = {}
        for n, shape in shapes.items():
            key = f"{p}{_SEP}{n}"
            t = tensors[key]
            if t.dtype != torch.int32 or tuple(t.shape) != _bits_shape(shape):
                raise MaskFileError(
                    f"MaskBank.load: {path}: tensor {key!r} is {t.dtype}{list(t.shape)}, "
                    f"expected int32{list(_bits_shape(shape))}")
            if _sha256(t) != sums[key]:
                raise MaskFileError(f"MaskBank.load: checksum mismatch for tensor {key!r} "
                                    f"in {path} (file corrupted?)")
            masks[n] = t
        out[p] = masks
    return spec, out


def _decompact(blob: Tensor, shapes: Mapping[str, Sequence[int]], pairs: list[str], codec: str,
               path: str) -> dict[str, Tensor]:
    per_pair = [int(math.prod(_bits_shape(s))) * 4 for s in shapes.values()]
    expected = sum(per_pair) * (1 + len(pairs)) if pairs else 0
    if expected > sys.maxsize // 2:
        raise MaskFileError(f"MaskBank.load: {path}: field 'shapes' implies {expected} "
                            "bytes of masks, more than this machine can address")
    try:
        raw = _decompress(blob.numpy().tobytes(), codec, expected)
    except MaskFileError as e:
        raise MaskFileError(f"MaskBank.load: compact blob of {path} {e}") from None
    except Exception as e:
        raise MaskFileError(f"MaskBank.load: compact blob of {path} does not decode "
                            f"({codec}): {e}") from None
    if len(raw) != expected:  # _decompress refuses more; fewer is a truncated stream
        raise MaskFileError(f"MaskBank.load: compact blob of {path} is truncated: "
                            f"{len(raw)} of the {expected} bytes its shapes imply")
    flat = torch.frombuffer(bytearray(raw), dtype=torch.int32) if raw else None
    del raw
    out, off = {}, 0
    for (n, shape), nbytes in zip(shapes.items(), per_pair):
        if not pairs:
            break
        bshape = _bits_shape(shape)

        def take(nbytes=nbytes, bshape=bshape):
            nonlocal off
            t = flat[off // 4:(off + nbytes) // 4].view(bshape)
            off += nbytes
            return t

        base = take()
        for p in pairs:
            out[f"{p}{_SEP}{n}"] = take() ^ base
    return out


def _meta_digest(meta: Mapping[str, str]) -> str:
    """sha256 over every metadata field but ``meta_sha256`` itself (canonical JSON)."""
    body = json.dumps({k: v for k, v in meta.items() if k != "meta_sha256"}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(body.encode()).hexdigest()


def _parse_metadata(meta: Mapping[str, str], keys: list[str], path: str) -> dict:
    """Validate every metadata field of a mask-bank file (and its tensor names) before anything
    is loaded; returns the parsed fields. Raises MaskFileError naming the file and the field."""

    def bad(field: str, what: str) -> MaskFileError:
        return MaskFileError(f"MaskBank.load: {path}: field {field!r} {what}")

    def parse(field: str):
        try:
            return json.loads(meta[field])
        except Exception as e:  # JSONDecodeError, RecursionError on deep nesting
            raise bad(field, f"is not valid JSON ({type(e).__name__})") from None

    if meta.get("format") != FORMAT:
        raise MaskFileError(f"MaskBank.load: {path} is not a mask bank (format="
                            f"{meta.get('format')!r})")
    version = meta.get("format_version")
    if version not in tuple(str(v) for v in READ_VERSIONS):
        raise MaskFileError(f"MaskBank.load: {path} has format version {version}, this library "
                            f"reads {', '.join(map(str, READ_VERSIONS))}")
    layout = meta.get("layout")
    want = set(_META_KEYS)
    if version != "1":
        want.add("meta_sha256")
    if layout == "compact":
        want.add("codec")
    if version != "1":  # the checksum covers every other field: check it first
        if "meta_sha256" not in meta:
            raise bad("meta_sha256", "is missing")
        if meta["meta_sha256"] != _meta_digest(meta):
            raise bad("meta_sha256", "does not match the metadata: the header was corrupted "
                      "or edited")
    if layout not in ("plain", "compact"):
        raise bad("layout", f"is {layout!r}; expected 'plain' or 'compact'")
    for k in sorted(want - set(meta)):
        raise bad(k, "is missing")
    for k in sorted(set(meta) - want):
        raise bad(k, "is unknown to this format")
    if layout == "compact" and meta["codec"] not in _CODECS:
        raise bad("codec", f"is {meta['codec']!r}; expected one of {list(_CODECS)}")
    alpha = parse("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or not 0.0 <= alpha <= 1.0):
        raise bad("alpha", f"is {meta['alpha']!r}; expected null or a number in [0, 1]")
    shapes_raw = parse("shapes")
    if not isinstance(shapes_raw, dict):
        raise bad("shapes", "is not a JSON object {name: shape}")
    shapes: dict[str, tuple[int, ...]] = {}
    for n, s in shapes_raw.items():
        if not n or _SEP in n:
            raise bad("shapes", f"has an invalid parameter name {n!r}")
        if (not isinstance(s, list) or not 1 <= len(s) <= 8
                or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in s)):
            raise bad("shapes", f"has an invalid shape for {n!r}: {s!r}")
        shapes[n] = tuple(s)
    pairs = parse("pairs")
    if not isinstance(pairs, list) or not all(
        isinstance(p, str) and p and _SEP not in p for p in pairs
    ):
        raise bad("pairs", "is not a list of pair names")
    if len(set(pairs)) != len(pairs):
        raise bad("pairs", "lists a pair twice")
    expected = {f"{p}{_SEP}{n}" for p in pairs for n in shapes}
    sums = parse("sha256")
    if not isinstance(sums, dict) or not all(
        isinstance(v, str) and _HEX64.match(v) for v in sums.values()
    ):
        raise bad("sha256", "is not a JSON object {tensor: sha256 hex digest}")
    if set(sums) != expected:
        odd = sorted(set(sums) ^ expected)[:3]
        raise bad("sha256", f"does not list exactly the tensors of 'pairs' x 'shapes' "
                  f"(differs at {odd})")
    have = set(keys)
    if layout == "compact":
        if have != {"__compact__"}:
            raise bad("layout", f"is 'compact' but the file holds tensors {sorted(have)[:3]}, "
                      "not one '__compact__' blob")
    elif have != expected:
        extra, missing = sorted(have - expected)[:3], sorted(expected - have)[:3]
        raise bad("pairs", f"and 'shapes' do not match the file's tensors: missing {missing}, "
                  f"unexpected {extra}")
    return {"layout": layout, "codec": meta.get("codec"), "alpha": alpha, "rule": meta["rule"],
            "shapes": shapes, "pairs": pairs, "sha256": sums}


def _majority(stacked: Tensor, k: int) -> Tensor:
    """Per-bit majority over the pairs of ``int32[P, rows, W]`` (ties -> 1), packed."""
    p = stacked.shape[0]
    rows = stacked.shape[1:-1]
    flat = stacked.reshape(p, -1, stacked.shape[-1])
    count = torch.zeros(flat.shape[1], k, dtype=torch.int32)
    for i in range(p):
        count += unpack_mask(flat[i].contiguous(), k)
    return pack_mask(count * 2 >= p).reshape(*rows, num_words(k))


def _pick_codec(codec: str) -> str:
    if codec == "auto":
        try:
            import zstandard  # noqa: F401

            return "zstd"
        except ImportError:
            return "lzma"
    if codec not in ("zstd", "lzma"):
        raise ValueError(f"codec must be auto, zstd or lzma, got {codec!r}")
    return codec


def _compress(data: bytes, codec: str) -> bytes:
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdCompressor(level=19).compress(data)
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def _decompress(data: bytes, codec: str, limit: int) -> bytes:
    """Decompress at most ``limit`` bytes; a stream holding more is refused (a decompression
    bomb) before more than ``limit + 1`` bytes are produced. Trailing data is refused too."""
    if codec == "zstd":
        import zstandard

        chunks, total = [], 0
        with zstandard.ZstdDecompressor().stream_reader(io.BytesIO(data)) as reader:
            while total <= limit:
                chunk = reader.read(min(limit + 1 - total, 1 << 24))
                if not chunk:
                    break
                chunks.append(chunk)
                total += len(chunk)
        out = b"".join(chunks)
    elif codec == "lzma":
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
        out = d.decompress(data, max_length=limit + 1)
        if len(out) <= limit and not d.eof:
            raise MaskFileError("is truncated (the xz stream does not end)")
        if d.eof and d.unused_data:
            raise MaskFileError(f"has {len(d.unused_data)} bytes after the end of its xz "
                                "stream")
    else:
        raise MaskFileError(f"has an unknown codec {codec!r}")
    if len(out) > limit:
        raise MaskFileError(f"decompresses to more than the {limit} bytes its shapes imply "
                            "(refused: corrupted file or decompression bomb)")
    return out


__all__ = ["FORMAT", "FORMAT_VERSION", "READ_VERSIONS", "MaskFileError", "read_bank",
           "write_bank"]
