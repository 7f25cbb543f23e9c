"""MaskBank: every language pair's packed masks (DESIGN §2), with files, similarity and merges.

A bank maps ``pair -> {parameter name -> int32 bits}``; bits follow the packed format of
:mod:`lass_sparse.bitmask` (``int32[rows, ceil(K/32)]`` for a weight ``[rows, K]``). In memory a
bank costs exactly one bit per weight per pair (plus row padding to 32). Files are safetensors,
never pickle, with a format version, the pruning rule and a sha256 per tensor;
``save(compact=True)`` stores a shared base mask plus per-pair XOR deltas, compressed.
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
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from .bitmask import WORD_BITS, num_words, popcount, validate_bits
from .ops import magnitude_mask, pack_mask, unpack_mask

FORMAT = "lass_sparse.maskbank"
FORMAT_VERSION = 2  # 2: the metadata is checksummed too ("meta_sha256")
READ_VERSIONS = (1, 2)
_SEP = "::"  # tensor key = pair + _SEP + parameter name
_META_KEYS = frozenset({"format", "format_version", "layout", "alpha", "rule", "shapes", "pairs",
                        "sha256"})
_CODECS = ("zstd", "lzma")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class MaskFileError(ValueError):
    """A mask-bank file that is malformed, corrupted or edited (names the file and the field)."""


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


_TMP_RE = re.compile(r"^\.tmp-(\d+)@([0-9a-f]{8})-[a-z0-9_]+\.")
_OLD_TMP_AGE = 3600.0  # seconds: a temp file whose writer cannot be checked is stale after 1 h


def _host_tag() -> str:
    import socket

    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _tmp_prefix(pid: int | None = None) -> str:
    """``.tmp-<pid>@<host>-``: lets a later write tell a killed writer's leftovers (same host,
    pid gone) from a live writer's file (another host sharing the folder: by age only)."""
    return f".tmp-{os.getpid() if pid is None else pid}@{_host_tag()}-"


def _umask() -> int:
    try:  # Linux: read it without changing it (os.umask is process-wide, not thread-safe)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def remove_stale_temp_files(folder: str) -> list[str]:
    """Delete the ``.tmp-*`` files in ``folder`` that :func:`atomic_write` calls killed mid-write
    left behind: those whose writer process (on this host) is gone; those of other hosts or
    without a pid (older versions) when older than an hour. Returns the removed paths."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    now = time.time()
    host = _host_tag()
    for name in names:
        if not name.startswith(".tmp-"):
            continue
        path = os.path.join(folder, name)
        m = _TMP_RE.match(name)
        try:
            if m is not None and m.group(2) == host:
                stale = not _pid_alive(int(m.group(1)))
            else:
                stale = now - os.stat(path).st_mtime > _OLD_TMP_AGE
            if stale and os.path.isfile(path):
                os.unlink(path)
                removed.append(path)
        except OSError:
            continue  # raced with another cleaner or the writer itself
    return removed


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms that cannot open a directory (Windows)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temp file in the same folder and a rename: a crash leaves
    either the old file or the new one, never half of one. The file gets the mode the umask
    gives a new file (``0o666 & ~umask``); the folder is fsynced after the rename so the rename
    itself survives a power loss; temp files of earlier killed writes are removed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    remove_stale_temp_files(folder)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=_tmp_prefix(),
                               suffix="." + os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(folder)


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
        a = self.alpha
        if a is not None and (isinstance(a, bool) or not isinstance(a, (int, float))
                              or not math.isfinite(a) or not 0.0 <= a <= 1.0):
            raise ValueError(f"MaskBank.save: alpha must be None or a number in [0, 1], got {a!r}")
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
        meta["meta_sha256"] = _meta_digest(meta)
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
        """Read a bank written by :meth:`save`. Every metadata field is validated and (format
        version 2) checksummed with the tensors before any tensor is read or decompressed; a
        compact blob is decompressed only up to the size the shapes imply. A malformed,
        truncated or edited file raises :class:`MaskFileError` (a ValueError) naming the file and
        the field or tensor."""
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
        bank = cls(shapes, alpha=spec["alpha"], rule=spec["rule"])
        if spec["layout"] == "compact":
            blob = tensors["__compact__"]
            if blob.dtype != torch.uint8 or blob.dim() != 1:
                raise MaskFileError(f"MaskBank.load: {path}: tensor '__compact__' is "
                                    f"{blob.dtype}{list(blob.shape)}, expected a uint8 vector")
            tensors = bank._decompact(blob, pairs, spec["codec"], path)
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
            try:
                bank.add_pair(p, masks)
            except ValueError as e:
                raise MaskFileError(f"MaskBank.load: {path}: pair {p!r}: {e}") from None
        return bank.to(device)

    def _decompact(self, blob: Tensor, pairs: list[str], codec: str, path: str):
        per_pair = [int(math.prod(_bits_shape(s))) * 4 for s in self.shapes.values()]
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
        for (n, shape), nbytes in zip(self.shapes.items(), per_pair):
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


__all__ = ["MaskBank", "MaskFileError", "WORD_BITS", "atomic_write", "component_key",
           "layer_key", "magnitude_chunks", "remove_stale_temp_files"]
