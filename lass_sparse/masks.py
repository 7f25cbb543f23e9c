"""MaskBank: every language pair's packed masks (DESIGN §2), with similarity and merges.

A bank maps ``pair -> {parameter name -> int32 bits}``; bits follow the packed format of
:mod:`lass_sparse.bitmask` (``int32[rows, ceil(K/32)]`` for a weight ``[rows, K]``). In memory a
bank costs exactly one bit per weight per pair (plus row padding to 32).

This module holds the bank as data (pairs, combining, similarity, statistics). The layers below
it: :mod:`lass_sparse.pruning` decides which parameters a mask covers and applies the magnitude
rule (``from_model``, ``masks_from_model``); :mod:`lass_sparse.maskio` is the file format
(``save``/``load``: safetensors, never pickle, with a format version, the pruning rule and
checksums; ``save(compact=True)`` stores a shared base mask plus per-pair XOR deltas,
compressed); :mod:`lass_sparse.fileio` writes files atomically. Their public names are
re-exported here for compatibility.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from . import maskio, pruning
from .bitmask import WORD_BITS, popcount, validate_bits
from .fileio import _tmp_prefix, atomic_write, remove_stale_temp_files  # noqa: F401
from .maskio import (  # noqa: F401  (re-exported for compatibility)
    _SEP,
    FORMAT,
    FORMAT_VERSION,
    READ_VERSIONS,
    MaskFileError,
    _bits_shape,
    _meta_digest,
)
from .ops import pack_mask
from .pruning import magnitude_chunks


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
        return pruning.masked_parameters(model)

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
        return pruning.chunks_of(model, names)

    def masks_from_model(
        self, model: torch.nn.Module, alpha: float | None = None,
        chunks: Mapping[str, int] | None = None,
    ) -> dict[str, Tensor]:
        """Magnitude masks of ``model``'s parameters for this bank's names (for ``add_pair``)."""
        alpha = self.alpha if alpha is None else alpha
        if alpha is None:
            raise ValueError("masks_from_model: alpha is unknown; pass alpha=")
        chunks = chunks or self._chunks(model, self.names)
        return pruning.magnitude_masks(model, self.shapes, alpha, chunks)

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
        """``{name -> int32[P, rows, ceil(K/32)]}`` for the segmented kernel.

        Every pair's stack (``pairs`` None, or the bank's pairs in order) is built once, and the
        bank's per-pair bits become views of it, so a bank holds 1 bit per weight per pair, not
        2. A subset is gathered from it (a new tensor, not cached): mixed-pair callers index the
        full stack with :meth:`pair_index` instead."""
        full = tuple(self._masks)
        if not full:
            raise ValueError("MaskBank.stack: the bank has no pairs")
        if full not in self._stacks:
            st = {n: torch.stack([self._masks[p][n] for p in full]) for n in self.names}
            for i, p in enumerate(full):
                self._masks[p] = {n: st[n][i] for n in self.names}
            self._stacks.clear()
            self._stacks[full] = st
        if pairs is None or tuple(pairs) == full:
            return self._stacks[full]
        idx = torch.tensor(self.pair_index(pairs), dtype=torch.long)
        return {n: t.index_select(0, idx) for n, t in self._stacks[full].items()}

    def pair_index(self, pairs: Sequence[str]) -> list[int]:
        """Positions of ``pairs`` in :meth:`stack`'s first dimension (the bank's pair order)."""
        order = {p: i for i, p in enumerate(self._masks)}
        out = []
        for p in pairs:
            self._check_pair(p)
            out.append(order[p])
        return out

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

    def save(self, path: str, *, compact: bool = False, codec: str = "auto") -> int:
        """Write the bank to ``path`` (safetensors, atomically). Returns the file size in bytes.

        ``compact=True`` stores the bitwise-majority base mask plus one XOR delta per pair,
        compressed with ``codec`` ("zstd" if the ``zstandard`` module is installed, else "lzma").
        """
        return maskio.write_bank(path, self.shapes, self.alpha, self.rule, self._masks,
                                 compact=compact, codec=codec)

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu") -> MaskBank:
        """Read a bank written by :meth:`save`. Every metadata field is validated and (format
        version 2) checksummed with the tensors before any tensor is read or decompressed; a
        compact blob is decompressed only up to the size the shapes imply. A malformed,
        truncated or edited file raises :class:`MaskFileError` (a ValueError) naming the file and
        the field or tensor."""
        spec, masks = maskio.read_bank(path)
        bank = cls(spec["shapes"], alpha=spec["alpha"], rule=spec["rule"])
        for p, m in masks.items():
            try:
                bank.add_pair(p, m)
            except ValueError as e:
                raise MaskFileError(f"MaskBank.load: {path}: pair {p!r}: {e}") from None
        return bank.to(device)


__all__ = ["MaskBank", "MaskFileError", "WORD_BITS", "atomic_write", "component_key",
           "layer_key", "magnitude_chunks", "remove_stale_temp_files"]
