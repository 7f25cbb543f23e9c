"""MaskBank: every language pair's packed masks (DESIGN §2), with files, similarity and merges.

A bank maps ``pair -> {parameter name -> int32 bits}``; bits follow the packed format of
:mod:`lass_sparse.bitmask` (``int32[rows, ceil(K/32)]`` for a weight ``[rows, K]``). In memory a
bank costs exactly one bit per weight per pair (plus row padding to 32). Files are safetensors,
never pickle, with a format version, the pruning rule and a sha256 per tensor;
``save(compact=True)`` stores a shared base mask plus per-pair XOR deltas, compressed.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import tempfile
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .bitmask import WORD_BITS, num_words, popcount, validate_bits
from .ops import magnitude_mask, pack_mask, unpack_mask

FORMAT = "lass_sparse.maskbank"
FORMAT_VERSION = 1
_SEP = "::"  # tensor key = pair + _SEP + parameter name


def _sha256(t: Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _bits_shape(shape: Sequence[int]) -> tuple[int, ...]:
    return (*shape[:-1], num_words(shape[-1]))


def magnitude_chunks(weight: Tensor, alpha: float, chunks: int = 1) -> Tensor:
    """The LaSS rule per tensor; ``chunks > 1`` splits the rows into equal parts pruned separately
    (a packed ``in_proj_weight`` holds q, k and v, which LaSS prunes as three tensors)."""
    if chunks == 1:
        return magnitude_mask(weight, alpha)
    if weight.shape[0] % chunks:
        raise ValueError(f"magnitude_chunks: {weight.shape[0]} rows do not split into {chunks}")
    return torch.cat([magnitude_mask(w, alpha) for w in weight.chunk(chunks, 0)])


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename: a crash leaves
    either the old file or the new one, never half of one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def layer_key(name: str) -> str:
    """Group key for ``similarity(by="layer")``: the name up to its first numeric component
    (``encoder.layers.3.fc1.weight`` -> ``encoder.layers.3``)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


def component_key(name: str) -> str:
    """Group key for ``similarity(by="component")``: the name with layer indices wildcarded
    (``encoder.layers.3.fc1.weight`` -> ``encoder.layers.*.fc1.weight``)."""
    return re.sub(r"(?<=\.)\d+(?=\.)", "*", name)


class MaskBank:
    """Packed masks for many pairs over one set of parameters.

    Args:
        shapes: parameter name -> weight shape (``[rows, K]``); masks of every pair cover exactly
            these names.
        alpha: pruning ratio the masks were made with (metadata; None if unknown).
        rule: how the masks were made (``"magnitude"``, ``"random"``, ...; metadata).
    """

    def __init__(
        self,
        shapes: Mapping[str, Sequence[int]],
        *,
        alpha: float | None = None,
        rule: str = "magnitude",
    ) -> None:
        self.shapes: dict[str, tuple[int, ...]] = {}
        for n, s in shapes.items():
            s = tuple(int(d) for d in s)
            if len(s) < 1 or min(s) < 0:
                raise ValueError(f"MaskBank: shapes[{n!r}] must be a weight shape, got {s}")
            self.shapes[n] = s
        self.alpha = alpha
        self.rule = rule
        self._masks: dict[str, dict[str, Tensor]] = {}
        self._stacks: dict[tuple, dict[str, Tensor]] = {}
        self.version = 0  # bumped on every change; attached models drop device copies

    # ------------------------------------------------------------------------------- basics

    @property
    def pairs(self) -> list[str]:
        return list(self._masks)

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def __len__(self) -> int:
        return len(self._masks)

    def __contains__(self, pair: object) -> bool:
        return pair in self._masks

    def __iter__(self):
        return iter(self._masks)

    def __repr__(self) -> str:
        return (f"MaskBank(pairs={self.pairs}, params={len(self.shapes)}, alpha={self.alpha}, "
                f"rule={self.rule!r})")

    def _check_pair(self, pair: str) -> dict[str, Tensor]:
        try:
            return self._masks[pair]
        except KeyError:
            raise KeyError(
                f"MaskBank: unknown pair {pair!r}; known pairs: {sorted(self._masks) or 'none'}"
            ) from None

    def __getitem__(self, pair: str) -> dict[str, Tensor]:
        """``{parameter name -> bits}`` of one pair (the bank's own tensors; do not modify)."""
        return dict(self._check_pair(pair))

    def bits(self, pair: str, name: str) -> Tensor:
        masks = self._check_pair(pair)
        try:
            return masks[name]
        except KeyError:
            raise KeyError(f"MaskBank: no mask for parameter {name!r}") from None

    def _changed(self) -> None:
        self._stacks.clear()
        self.version += 1

    def add_pair(self, pair: str, masks: Mapping[str, Tensor], *, overwrite: bool = False) -> None:
        """Add ``pair`` with ``{name -> bool[rows, K] mask or int32 packed bits}`` covering exactly
        the bank's parameters."""
        if not isinstance(pair, str) or not pair or _SEP in pair:
            raise ValueError(f"MaskBank.add_pair: pair must be a non-empty str without "
                             f"{_SEP!r}, got {pair!r}")
        if pair in self._masks and not overwrite:
            raise ValueError(f"MaskBank.add_pair: pair {pair!r} exists (pass overwrite=True)")
        missing = set(self.shapes) - set(masks)
        extra = set(masks) - set(self.shapes)
        if missing or extra:
            raise ValueError(
                f"MaskBank.add_pair({pair!r}): masks must cover exactly the bank's parameters; "
                f"missing {sorted(missing)[:5]}, unexpected {sorted(extra)[:5]}"
            )
        out = {}
        for name, shape in self.shapes.items():
            m = masks[name]
            if not isinstance(m, Tensor):
                raise TypeError(f"MaskBank.add_pair: masks[{name!r}] must be a Tensor")
            if m.dtype == torch.bool:
                if tuple(m.shape) != shape:
                    raise ValueError(f"MaskBank.add_pair: masks[{name!r}] is bool{list(m.shape)},"
                                     f" the parameter is {list(shape)}")
                m = pack_mask(m.reshape(-1, shape[-1])).reshape(_bits_shape(shape))
            else:
                want = _bits_shape(shape)
                if m.dtype != torch.int32 or tuple(m.shape) != want:
                    raise ValueError(
                        f"MaskBank.add_pair: masks[{name!r}] must be bool{list(shape)} or "
                        f"int32{list(want)} packed bits, got {m.dtype}{list(m.shape)}"
                    )
                validate_bits(m, shape[-1], name=f"masks[{name!r}]")
            out[name] = m.contiguous()
        self._masks[pair] = out
        self._changed()

    def remove_pair(self, pair: str) -> None:
        self._check_pair(pair)
        del self._masks[pair]
        self._changed()

    def to(self, device: torch.device | str) -> MaskBank:
        """Move every mask to ``device`` (in place; returns self)."""
        for masks in self._masks.values():
            for n, b in masks.items():
                masks[n] = b.to(device)
        self._changed()
        return self

    def equal(self, other: MaskBank) -> bool:
        """Same parameters, pairs and bits (metadata aside)."""
        return (self.shapes == other.shapes and self.pairs == other.pairs and all(
            torch.equal(self._masks[p][n].cpu(), other._masks[p][n].cpu())
            for p in self.pairs for n in self.names))

    # ------------------------------------------------------------------------------ making

    @staticmethod
    def masked_parameters(model: torch.nn.Module) -> dict[str, int]:
        """``{name -> chunks}`` of the parameters a LaSS mask covers in ``model`` (see
        :func:`lass_sparse.nn.masked_parameters`)."""
        from .nn import masked_parameters

        return masked_parameters(model)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        alpha: float,
        names: Iterable[str] | Mapping[str, int] | None = None,
        *,
        pair: str = "default",
    ) -> MaskBank:
        """A bank holding ``pair``'s magnitude masks of ``model`` (typically a model fine-tuned on
        that pair): per tensor, keep ``|w| > kthvalue(|w|, int(alpha * numel))``."""
        chunks = cls._chunks(model, names)
        bank = cls({n: model.get_parameter(n).shape for n in chunks}, alpha=alpha,
                   rule="magnitude")
        bank.add_pair(pair, bank.masks_from_model(model, alpha, chunks))
        return bank

    @classmethod
    def _chunks(cls, model, names) -> dict[str, int]:
        if names is None:
            return cls.masked_parameters(model)
        if isinstance(names, Mapping):
            return {n: int(c) for n, c in names.items()}
        return {n: 3 if n.endswith("in_proj_weight") else 1 for n in names}

    def masks_from_model(
        self, model: torch.nn.Module, alpha: float | None = None,
        chunks: Mapping[str, int] | None = None,
    ) -> dict[str, Tensor]:
        """Magnitude masks of ``model``'s parameters for this bank's names (for ``add_pair``)."""
        alpha = self.alpha if alpha is None else alpha
        if alpha is None:
            raise ValueError("masks_from_model: alpha is unknown; pass alpha=")
        chunks = chunks or self._chunks(model, self.names)
        out = {}
        for n, shape in self.shapes.items():
            try:  # get_parameter also finds aliases (a tied output head's weight)
                p = model.get_parameter(n)
            except AttributeError:
                raise KeyError(f"masks_from_model: model has no parameter {n!r}") from None
            if tuple(p.shape) != shape:
                raise ValueError(f"masks_from_model: parameter {n!r} is {list(p.shape)}, the "
                                 f"bank expects {list(shape)}")
            out[n] = magnitude_chunks(p.detach(), alpha, chunks.get(n, 1))
        return out

    def random_like(self, alpha: float | None = None, seed: int = 0) -> MaskBank:
        """The random-mask control: same pairs and parameters, each mask keeping the same number
        of weights the magnitude rule keeps at ``alpha`` (``numel - int(alpha*numel)``), uniformly
        at random; deterministic in (seed, pair, name)."""
        alpha = self.alpha if alpha is None else alpha
        if alpha is None or not 0.0 <= alpha < 1.0:
            raise ValueError(f"random_like: alpha must be in [0, 1), got {alpha}")
        bank = MaskBank(self.shapes, alpha=alpha, rule="random")
        for pair in self.pairs:
            masks = {}
            for n, shape in self.shapes.items():
                g = torch.Generator().manual_seed(zlib.crc32(f"{seed}|{pair}|{n}".encode()))
                numel = int(torch.tensor(shape).prod())
                keep = torch.zeros(numel, dtype=torch.bool)
                keep[torch.randperm(numel, generator=g)[int(alpha * numel):]] = True
                masks[n] = keep.view(shape)
            bank.add_pair(pair, masks)
        return bank

    # --------------------------------------------------------------------------- combining

    def _reduce(self, pairs: Sequence[str], op: Callable[[Tensor, Tensor], Tensor]):
        if not pairs:
            raise ValueError("MaskBank: need at least one pair")
        out = dict(self._check_pair(pairs[0]))
        for p in pairs[1:]:
            masks = self._check_pair(p)
            out = {n: op(b, masks[n]) for n, b in out.items()}
        return out

    def union(self, pairs: Sequence[str]) -> dict[str, Tensor]:
        """Bitwise OR of the masks of ``pairs`` (what an optimizer step over them may change)."""
        return self._reduce(list(pairs), torch.bitwise_or)

    def intersection(self, pairs: Sequence[str]) -> dict[str, Tensor]:
        return self._reduce(list(pairs), torch.bitwise_and)

    def merge(
        self,
        first: str,
        second: str,
        *,
        encoder_prefix: str = "encoder.",
        decoder_prefix: str = "decoder.",
        other: str = "union",
    ) -> dict[str, Tensor]:
        """Zero-shot mask: encoder parameters from ``first``'s mask, decoder parameters from
        ``second``'s (``merge("fr-en", "en-zh")`` serves fr-zh). Parameters under neither prefix
        take ``other``: "first", "second", "union" or "intersection"."""
        if other not in ("first", "second", "union", "intersection"):
            raise ValueError(f"merge: other must be first/second/union/intersection, got {other!r}")
        a, b = self._check_pair(first), self._check_pair(second)
        out = {}
        for n in self.names:
            if n.startswith(encoder_prefix):
                out[n] = a[n]
            elif n.startswith(decoder_prefix):
                out[n] = b[n]
            else:
                out[n] = {"first": a[n], "second": b[n], "union": a[n] | b[n],
                          "intersection": a[n] & b[n]}[other]
        return out

    def stack(self, pairs: Sequence[str] | None = None) -> dict[str, Tensor]:
        """``{name -> int32[P, rows, ceil(K/32)]}`` for the segmented kernel (cached)."""
        pairs = tuple(self.pairs if pairs is None else pairs)
        if pairs not in self._stacks:
            masks = [self._check_pair(p) for p in pairs]
            self._stacks[pairs] = {n: torch.stack([m[n] for m in masks]) for n in self.names}
        return self._stacks[pairs]

    # -------------------------------------------------------------------------- statistics

    def similarity(
        self, first: str, second: str, by: str | Callable[[str], str] = "total"
    ) -> float | dict[str, float]:
        """LaSS Eq. 2: ``|M1 ∩ M2| / |M1|``, by popcount on the packed words (no unpacking).

        ``by``: "total" (one number), "param", "layer" (:func:`layer_key`), "component"
        (:func:`component_key`), or a function mapping a parameter name to its group.
        """
        a, b = self._check_pair(first), self._check_pair(second)
        key: Callable[[str], str]
        if by == "total":
            key = lambda n: "total"  # noqa: E731
        elif by == "param":
            key = lambda n: n  # noqa: E731
        elif by == "layer":
            key = layer_key
        elif by == "component":
            key = component_key
        elif callable(by):
            key = by
        else:
            raise ValueError(f"similarity: by must be total/param/layer/component or a function,"
                             f" got {by!r}")
        inter: dict[str, int] = {}
        size: dict[str, int] = {}
        for n in self.names:
            g = key(n)
            inter[g] = inter.get(g, 0) + int(popcount(a[n] & b[n]).sum())
            size[g] = size.get(g, 0) + int(popcount(a[n]).sum())
        out = {g: inter[g] / size[g] if size[g] else float("nan") for g in inter}
        return out["total"] if by == "total" else out

    def stats(self) -> dict[str, object]:
        """Sizes: weights covered, packed bytes per pair (in memory), bits per weight per pair,
        what bool masks would take, and each pair's kept fraction."""
        weights = sum(int(torch.tensor(s).prod()) for s in self.shapes.values())
        packed = sum(int(torch.tensor(_bits_shape(s)).prod()) * 4 for s in self.shapes.values())
        kept = {
            p: sum(int(popcount(b).sum()) for b in m.values()) / max(weights, 1)
            for p, m in self._masks.items()
        }
        return {
            "pairs": len(self._masks),
            "params": len(self.shapes),
            "weights_per_pair": weights,
            "bytes_per_pair": packed,
            "bits_per_weight_per_pair": packed * 8 / max(weights, 1),
            "total_bytes": packed * len(self._masks),
            "bool_bytes_per_pair": weights,
            "kept_fraction": kept,
        }

    # ------------------------------------------------------------------------------- files

    def _metadata(self, layout: str) -> dict[str, str]:
        return {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "layout": layout,
            "alpha": json.dumps(self.alpha),
            "rule": self.rule,
            "shapes": json.dumps({n: list(s) for n, s in self.shapes.items()}),
            "pairs": json.dumps(self.pairs),
        }

    def save(self, path: str, *, compact: bool = False, codec: str = "auto") -> int:
        """Write the bank to ``path`` (safetensors, atomically). Returns the file size in bytes.

        ``compact=True`` stores the bitwise-majority base mask plus one XOR delta per pair,
        compressed with ``codec`` ("zstd" if the ``zstandard`` module is installed, else "lzma").
        """
        from safetensors.torch import save

        if compact:
            tensors, meta = self._compact(codec)
        else:
            tensors = {f"{p}{_SEP}{n}": b.detach().cpu().contiguous()
                       for p, m in self._masks.items() for n, b in m.items()}
            meta = self._metadata("plain")
        meta["sha256"] = json.dumps({
            f"{p}{_SEP}{n}": _sha256(b) for p, m in self._masks.items() for n, b in m.items()
        })
        data = save(tensors, metadata=meta)
        atomic_write(path, data)
        return len(data)

    def _compact(self, codec: str):
        codec = _pick_codec(codec)
        chunks = []
        for n in self.names if self.pairs else ():
            stacked = self.stack()[n].cpu()
            base = _majority(stacked, self.shapes[n][-1])
            chunks.append(base.numpy().tobytes())
            for i in range(len(self.pairs)):
                chunks.append((stacked[i] ^ base).numpy().tobytes())
        blob = _compress(b"".join(chunks), codec)
        meta = self._metadata("compact")
        meta["codec"] = codec
        tensors = {"__compact__": torch.frombuffer(bytearray(blob), dtype=torch.uint8)}
        return tensors, meta

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> MaskBank:
        """Read a bank written by :meth:`save`; refuses a file whose version, shapes or checksums
        do not match, naming the tensor."""
        from safetensors import safe_open

        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except FileNotFoundError:
            raise
        except Exception as e:  # safetensors raises its own error types for a bad header
            raise ValueError(
                f"MaskBank.load: {path} is not a readable safetensors file: {e}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"MaskBank.load: {path} is not a mask bank (format="
                             f"{meta.get('format')!r})")
        if meta.get("format_version") != str(FORMAT_VERSION):
            raise ValueError(f"MaskBank.load: {path} has format version "
                             f"{meta.get('format_version')}, this library reads {FORMAT_VERSION}")
        shapes = {n: tuple(s) for n, s in json.loads(meta["shapes"]).items()}
        pairs = json.loads(meta["pairs"])
        sums = json.loads(meta["sha256"])
        bank = cls(shapes, alpha=json.loads(meta["alpha"]), rule=meta["rule"])
        if meta["layout"] == "compact":
            tensors = bank._decompact(tensors["__compact__"], pairs, meta["codec"], path)
        for p in pairs:
            masks = {}
            for n, shape in shapes.items():
                key = f"{p}{_SEP}{n}"
                if key not in tensors:
                    raise ValueError(f"MaskBank.load: {path} lacks tensor {key!r}")
                t = tensors[key]
                if t.dtype != torch.int32 or tuple(t.shape) != _bits_shape(shape):
                    raise ValueError(f"MaskBank.load: tensor {key!r} is {t.dtype}{list(t.shape)},"
                                     f" expected int32{list(_bits_shape(shape))}")
                if _sha256(t) != sums.get(key):
                    raise ValueError(f"MaskBank.load: checksum mismatch for tensor {key!r} in "
                                     f"{path} (file corrupted?)")
                masks[n] = t
            bank.add_pair(p, masks)
        return bank.to(device)

    def _decompact(self, blob: Tensor, pairs: list[str], codec: str, path: str):
        try:
            raw = _decompress(blob.numpy().tobytes(), codec)
        except Exception as e:
            raise ValueError(f"MaskBank.load: compact blob of {path} does not decode ({codec}): "
                             f"{e}") from None
        out, off = {}, 0
        for n, shape in self.shapes.items() if pairs else ():
            bshape = _bits_shape(shape)
            nbytes = int(torch.tensor(bshape).prod()) * 4

            def take(nbytes=nbytes, bshape=bshape):
                nonlocal off
                if off + nbytes > len(raw):
                    raise ValueError(f"MaskBank.load: compact blob of {path} is truncated")
                t = torch.frombuffer(bytearray(raw[off:off + nbytes]), dtype=torch.int32)
                off += nbytes
                return t.view(bshape)

            base = take()
            for p in pairs:
                out[f"{p}{_SEP}{n}"] = take() ^ base
        return out


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


def _decompress(data: bytes, codec: str) -> bytes:
    if codec == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data)
    return lzma.decompress(data)


__all__ = ["MaskBank", "WORD_BITS", "atomic_write", "component_key", "layer_key",
           "magnitude_chunks"]
