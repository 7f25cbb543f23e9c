"""PEFT-style LaSS on Hugging Face models: ``get_lass_model``, per-pair masks, save/load, generate.

``get_lass_model(model, config)`` converts the model's linear layers in place (same parameters,
same ``state_dict`` keys), attaches an empty :class:`~lass_sparse.MaskBank` and gives the model the
LaSS methods below by making its class a subclass of its own class (``isinstance`` checks, the
``Trainer`` and ``generate()`` keep working). ``save_pretrained`` writes the ordinary Hugging Face
weights plus ``lass_masks.safetensors`` and ``lass_config.json``; plain ``transformers`` loads the
folder as the dense model.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..masks import MaskBank
from ..nn import attach, convert, get_context, masked_parameters
from ..ops import unpack_mask

MASKS_FILE = "lass_masks.safetensors"
CONFIG_FILE = "lass_config.json"
_CONFIG_FORMAT = "lass_sparse.hf.config/1"


@dataclasses.dataclass
class LaSSConfig:
    """How LaSS masks a model (the analogue of a PEFT config).

    Args:
        alpha: fraction of each weight tensor pruned per pair (LaSS: 0.7 small data, 0.3 large).
        target_modules: glob patterns over module names to mask (None: every ``nn.Linear`` except
            embeddings and the output projection, as in the LaSS paper).
        exclude_modules: glob patterns never masked (None: the library defaults).
        mask_tied_output: also mask an output head tied to the embedding (``lm_head``): the head
            uses ``E ⊙ M`` while the lookup uses ``E`` (what the released LaSS code ran).
        compact: save the masks as shared base + XOR deltas, compressed.
    """

    alpha: float = 0.7
    target_modules: list[str] | None = None
    exclude_modules: list[str] | None = None
    mask_tied_output: bool = False
    compact: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(f"LaSSConfig: alpha must be in [0, 1), got {self.alpha}")
        for f in ("target_modules", "exclude_modules"):
            v = getattr(self, f)
            if isinstance(v, str):
                setattr(self, f, [v])

    def to_dict(self) -> dict[str, Any]:
        return {"format": _CONFIG_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LaSSConfig:
        if d.get("format") != _CONFIG_FORMAT:
            raise ValueError(f"not a LaSS config (format={d.get('format')!r}, expected "
                             f"{_CONFIG_FORMAT!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class LaSSModelMixin:
    """Methods a converted Hugging Face model gains from :func:`get_lass_model`."""

    lass_config: LaSSConfig
    lass_bank: MaskBank

    # ------------------------------------------------------------------------------ pairs

    @property
    def pairs(self) -> list[str]:
        """The pairs with a mask, in the bank's order."""
        return self.lass_bank.pairs

    @property
    def active_pair(self) -> str | None:
        """The pair whose mask the forward uses (None: dense or a mixed batch)."""
        return get_context(self).pair

    def resolve_pair(self, pair: str, pivot: str = "en") -> str:
        """``pair`` if it has a mask; else (zero-shot X→Y) add the merge of X→pivot's encoder mask
        and pivot→Y's decoder mask (the output head from pivot→Y) to the bank and return it."""
        bank = self.lass_bank
        if pair in bank:
            return pair
        src, _, tgt = pair.partition("-")
        a, b = f"{src}-{pivot}", f"{pivot}-{tgt}"
        if not (src and tgt and a in bank and b in bank):
            raise KeyError(f"no mask for pair {pair!r} and no {a!r} + {b!r} to merge for "
                           f"zero-shot; pairs: {bank.pairs}")
        enc, dec = self._lass_prefixes()
        bank.add_pair(pair, bank.merge(a, b, encoder_prefix=enc, decoder_prefix=dec,
                                       other="second"))
        return pair

    def _lass_prefixes(self) -> tuple[str, str]:
        """Parameter-name prefixes of the encoder and decoder stacks."""
        try:
            enc, dec = self.get_encoder(), self.get_decoder()
        except (AttributeError, NotImplementedError):
            raise NotImplementedError(f"{type(self).__name__} has no get_encoder()/get_decoder():"
                                      " zero-shot masks and mixed-pair generate need an "
                                      "encoder-decoder model") from None
        names = {id(m): n for n, m in self.named_modules()}
        if id(enc) not in names or id(dec) not in names:
            raise NotImplementedError("encoder/decoder are not submodules of the model")
        return names[id(enc)] + ".", names[id(dec)] + "."

    def set_pair(self, pair: str | None) -> None:
        """Run every later forward under ``pair``'s mask (None: the dense model), like PEFT's
        ``set_adapter``. An unknown X→Y is served zero-shot (see :meth:`resolve_pair`)."""
        get_context(self).set(None if pair is None else self.resolve_pair(pair))

    @contextlib.contextmanager
    def use_pair(self, pair: str | Sequence[str] | None,
                 pair_ids: Tensor | None = None) -> Iterator[None]:
        """``with model.use_pair("en-de"):`` — the pair's mask for the block only. With
        ``pair_ids`` (one id per batch row), ``pair`` lists the pairs the ids index: a mixed batch
        run by the segmented kernel."""
        ctx = get_context(self)
        saved = ctx.state()
        if pair_ids is None:
            pair = None if pair is None else self.resolve_pair(pair)
        else:
            pair = [self.resolve_pair(p) for p in ([pair] if isinstance(pair, str) else pair)]
        ctx.set(pair, pair_ids)
        try:
            yield
        finally:
            ctx.restore(saved)

    def add_pair(self, pair: str, masks: Mapping[str, Tensor] | nn.Module, *,
                 overwrite: bool = False) -> None:
        """Add ``pair``: ``masks`` is ``{name -> bool mask or packed bits}`` or a model fine-tuned
        on that pair (the LaSS rule at ``config.alpha``: per tensor, prune the α smallest |w|)."""
        if isinstance(masks, nn.Module):
            masks = self.lass_bank.masks_from_model(masks, self.lass_config.alpha,
                                                    self._lass_chunks)
        self.lass_bank.add_pair(pair, masks, overwrite=overwrite)

    # ------------------------------------------------------------------------------ dense

    def merge_and_unload(self, pair: str | None = None) -> nn.Module:
        """A plain ``transformers`` model (the original class, no masks) whose weights are
        ``W ⊙ M_pair`` (``pair=None``: the dense weights). A masked tied head is untied: it gets
        ``E ⊙ M`` while the embedding keeps ``E``."""
        if pair is not None:
            pair = self.resolve_pair(pair)
        plain = self._lass_base_class
        out = copy.deepcopy(self)
        out.__class__ = plain
        for attr in ("lass_config", "lass_bank", "_lass_chunks", "_lass_ctx"):
            out.__dict__.pop(attr, None)
        ids = {}
        for n, p in out.named_parameters(remove_duplicate=False):
            ids.setdefault(id(p), []).append(n)
        for mname, m in list(out.named_modules()):
            if not hasattr(m, "_lass_param_names"):
                continue
            if not isinstance(m, nn.Linear):
                raise NotImplementedError(f"merge_and_unload: {mname} is a "
                                          f"{type(m).__name__}, only linear layers are unloaded")
            prefix = f"{mname}." if mname else ""
            for pname in m._lass_param_names():
                full = prefix + pname
                w = m.get_parameter(pname)
                new = w.detach().clone()
                if pair is not None and full in self.lass_bank.shapes:
                    bits = self.lass_bank.bits(pair, full)
                    mask = unpack_mask(bits.reshape(-1, bits.shape[-1]), w.shape[-1])
                    new = new * mask.reshape(w.shape).to(new.dtype)
                tied = len(ids.get(id(w), [])) > 1
                if tied:  # the embedding keeps its (unmasked) matrix
                    out.config.tie_word_embeddings = False
                    if hasattr(out.config, "get_text_config"):
                        out.config.get_text_config().tie_word_embeddings = False
                m.weight = nn.Parameter(new, requires_grad=w.requires_grad)
            plain_m = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                                device="meta")
            plain_m.weight, plain_m.bias = m.weight, m.bias
            plain_m.train(m.training)
            parent_name, _, child = mname.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, plain_m)
        return out

    # ------------------------------------------------------------------------------ files

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any,
                        **kwargs: Any) -> None:
        """The Hugging Face ``save_pretrained`` (weights and config unchanged, loadable as the dense
        model by plain ``transformers``) plus ``lass_masks.safetensors`` and ``lass_config.json``.
        """
        super().save_pretrained(save_directory, *args, **kwargs)
        if not kwargs.get("is_main_process", True):
            return
        self.lass_bank.save(os.path.join(save_directory, MASKS_FILE),
                            compact=self.lass_config.compact)
        info = {**self.lass_config.to_dict(), "pairs": self.lass_bank.pairs,
                "base_model_class": self._lass_base_class.__name__}
        with open(os.path.join(save_directory, CONFIG_FILE), "w") as f:
            json.dump(info, f, indent=1)

    # ------------------------------------------------------------------------- generation

    def generate(self, *args: Any, pair: str | Sequence[str] | None = None,
                 **kwargs: Any) -> Any:
        """``transformers`` ``generate()`` under ``pair``'s mask. ``pair``: one name (the whole
        batch), or one name per batch row (a mixed batch: each row uses its own pair's mask
        through the segmented kernel, also under beam search / ``num_return_sequences``). None:
        whatever :meth:`set_pair` / :meth:`use_pair` made active."""
        if pair is None:
            return super().generate(*args, **kwargs)
        if isinstance(pair, str):
            with self.use_pair(pair):
                return super().generate(*args, **kwargs)
        rows = [self.resolve_pair(p) for p in pair]
        uniq = list(dict.fromkeys(rows))
        ids = torch.tensor([uniq.index(p) for p in rows], dtype=torch.long)
        batch = _batch_size(args, kwargs)
        if batch is not None and batch != len(rows):
            raise ValueError(f"generate: pair lists {len(rows)} pairs, the batch has {batch} rows")
        enc_prefix, dec_prefix = self._lass_prefixes()
        enc = self.get_submodule(enc_prefix[:-1])
        dec = self.get_submodule(dec_prefix[:-1])
        ctx = get_context(self)
        saved = ctx.state()

        def per_row(module, hargs, hkwargs):  # rows = batch * beams, row i from example i // k
            n = _batch_size(hargs, hkwargs)
            if n is None or n % len(rows):
                raise RuntimeError(f"generate: cannot map {n} rows of {type(module).__name__} "
                                   f"to the {len(rows)} examples' pairs")
            ctx.set(uniq, ids.repeat_interleave(n // len(rows)))

        hooks = [m.register_forward_pre_hook(per_row, with_kwargs=True) for m in (enc, dec)]
        try:
            ctx.set(uniq, ids)
            return super().generate(*args, **kwargs)
        except ValueError as e:
            if "pair_ids" in str(e):
                raise NotImplementedError(
                    f"{type(self).__name__}: a layer reshapes its activations so that rows no "
                    f"longer follow the batch; mixed-pair batches are not supported for this "
                    f"architecture ({e}); generate one pair at a time") from e
            raise
        finally:
            for h in hooks:
                h.remove()
            ctx.restore(saved)


def _batch_size(args: Sequence[Any], kwargs: Mapping[str, Any]) -> int | None:
    """Rows of the first tensor among the usual batch inputs of a generate/forward call."""
    for key in ("input_ids", "inputs", "inputs_embeds", "hidden_states", "encoder_hidden_states"):
        v = kwargs.get(key)
        if isinstance(v, Tensor):
            return v.shape[0]
    for v in args:
        if isinstance(v, Tensor):
            return v.shape[0]
    return None


_CLASSES: dict[type, type] = {}


def _lass_class(base: type) -> type:
    """``base`` with the LaSS mixin, same class name (so ``config.architectures`` is unchanged)."""
    if base not in _CLASSES:
        cls = type(base.__name__, (LaSSModelMixin, base), {"_lass_base_class": base})
        cls.__qualname__ = base.__qualname__
        cls.__doc__ = f"{base.__name__} with LaSS masks (lass_sparse.hf)."
        _CLASSES[base] = cls
    return _CLASSES[base]


def is_lass_model(model: nn.Module) -> bool:
    return isinstance(model, LaSSModelMixin)


def get_lass_model(model: nn.Module, config: LaSSConfig | None = None,
                   bank: MaskBank | None = None) -> nn.Module:
    """Convert ``model`` (a ``transformers`` seq2seq model) in place for LaSS and return it.

    Its masked linear layers keep their parameters and ``state_dict`` keys. ``bank``: masks to
    attach (its parameter names must be the ones ``config`` selects); default: an empty bank,
    filled with :meth:`LaSSModelMixin.add_pair`.
    """
    config = config or LaSSConfig()
    if is_lass_model(model):
        raise ValueError("get_lass_model: the model is already a LaSS model")
    convert(model, include=config.target_modules, exclude=config.exclude_modules,
            mask_tied_output=config.mask_tied_output)
    chunks = masked_parameters(model)
    if not chunks:
        raise ValueError("get_lass_model: no linear layer matched target_modules "
                         f"{config.target_modules}")
    if bank is None:
        bank = MaskBank({n: model.get_parameter(n).shape for n in chunks}, alpha=config.alpha)
    elif set(bank.names) != set(chunks):
        diff = sorted(set(bank.names) ^ set(chunks))[:5]
        raise ValueError(f"get_lass_model: the bank masks other parameters than the config "
                         f"selects (e.g. {diff})")
    attach(model, bank)
    model.__class__ = _lass_class(type(model))
    model.lass_config = config
    model.lass_bank = bank
    model._lass_chunks = chunks
    return model


def _load_weights(model: nn.Module, path: str) -> None:
    """Load the safetensors weights (single file or sharded) of folder ``path`` into ``model``;
    keys of tied aliases may be absent, any other mismatch raises."""
    from safetensors.torch import load_file

    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors (or sharded index)")
    state: dict[str, Tensor] = {}
    for fn in files:
        state.update(load_file(os.path.join(path, fn)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    loaded = set(state)
    by_id: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(n)
    aliases = {n for names in by_id.values() if loaded & set(names) for n in names}
    bad = [k for k in missing if k not in aliases and not k.endswith("embed_positions.weight")]
    if bad or unexpected:
        raise ValueError(f"from_pretrained: weights in {path} do not match the model: missing "
                         f"{bad[:5]}, unexpected {list(unexpected)[:5]}")


def from_pretrained(base: nn.Module | type | str | None, path: str | os.PathLike,
                    **hf_kwargs: Any) -> nn.Module:
    """Load a folder written by ``save_pretrained`` of a LaSS model: weights and masks.

    ``base``: a ``transformers`` model instance of the saved architecture (the folder's weights
    are loaded into it), a model class (``cls.from_pretrained(path, **hf_kwargs)``), or None
    (``AutoModelForSeq2SeqLM``)."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, CONFIG_FILE)
    if not os.path.exists(cfg_file):
        raise FileNotFoundError(f"{path} has no {CONFIG_FILE}: not saved by a LaSS model")
    with open(cfg_file) as f:
        config = LaSSConfig.from_dict(json.load(f))
    if base is None or isinstance(base, str):
        from transformers import AutoModelForSeq2SeqLM

        model = AutoModelForSeq2SeqLM.from_pretrained(base or path, **hf_kwargs)
        if base is not None and base != path:
            _load_weights(model, path)
    elif isinstance(base, type):
        model = base.from_pretrained(path, **hf_kwargs)
    elif isinstance(base, nn.Module):
        if is_lass_model(base):
            raise ValueError("from_pretrained: base is already a LaSS model; pass the plain model")
        model = base
        _load_weights(model, path)
    else:
        raise TypeError(f"from_pretrained: base must be a model, a class, a path or None, got "
                        f"{type(base).__name__}")
    bank = MaskBank.load(os.path.join(path, MASKS_FILE))
    return get_lass_model(model, config, bank)
