"""``LaSSTrainer``: ``Seq2SeqTrainer`` with single-pair batches, the pair's mask per batch and
:class:`~lass_sparse.optim.MaskedAdamW`.

Each training batch comes from :class:`~lass_sparse.distributed.PairGroupedSampler` (temperature
sampling over pairs, rank-aware); its forward and backward run under that pair's mask, and the
pair is noted on the optimizer, so a step after gradient accumulation over several pairs updates
the union of their masks (across ranks too: ``gather_pairs``). On a model without masks (the
dense base or a per-pair fine-tune) it is a ``Seq2SeqTrainer`` with pair-grouped batches.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer

from ..distributed import PairGroupedSampler, gather_pairs
from ..optim import MaskedAdamW
from .data import LaSSCollator, PairDataset
from .model import is_lass_model


def _unwrap_optimizer(opt: Any) -> Any:
    while not isinstance(opt, MaskedAdamW) and hasattr(opt, "optimizer"):  # accelerate's wrapper
        opt = opt.optimizer
    return opt


class LaSSTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (``class T(LaSSTrainerMixin, Trainer)``);
    ``train_dataset`` / ``eval_dataset`` must be :class:`~lass_sparse.hf.data.PairDataset`."""

    def __init__(self, *args: Any, temperature: float = 5.0, max_tokens: int | None = None,
                 batches_per_epoch: int | None = None, **kwargs: Any) -> None:
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.batches_per_epoch = batches_per_epoch
        super().__init__(*args, **kwargs)
        for name in ("train_dataset", "eval_dataset"):
            ds = getattr(self, name)
            if ds is not None and not isinstance(ds, PairDataset):
                raise TypeError(f"LaSSTrainer: {name} must be a lass_sparse.hf.PairDataset "
                                f"(single-pair batches need its pairs), got {type(ds).__name__}")
        if kwargs.get("data_collator") is None:
            ds = self.train_dataset or self.eval_dataset
            if ds is not None:
                self.data_collator = LaSSCollator(ds.pad_id)
        if getattr(self.args, "predict_with_generate", False):
            raise NotImplementedError("LaSSTrainer: predict_with_generate is not supported "
                                      "(language tokens differ per pair); evaluate with "
                                      "lass_sparse.hf.translate")
        if self._lass() is not None and self.optimizer is not None:
            self._check_optimizer(self.optimizer)

    # ---------------------------------------------------------------------------- helpers

    def _lass(self) -> nn.Module | None:
        return self.model if is_lass_model(self.model) else None

    def _check_optimizer(self, opt: Any) -> MaskedAdamW:
        inner = _unwrap_optimizer(opt)
        if not isinstance(inner, MaskedAdamW):
            raise TypeError(
                f"LaSSTrainer: the optimizer of a LaSS model must be lass_sparse.optim.MaskedAdamW"
                f" (got {type(inner).__name__}): another optimizer moves off-mask weights "
                "through momentum and weight decay")
        if inner._bank is None:
            inner.bind(self.model, self.model.lass_bank)
        return inner

    # -------------------------------------------------------------------------- optimizer

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """MaskedAdamW (the ``TrainingArguments`` lr, betas, eps, weight decay groups) bound to the
        model's bank; the usual optimizer for a model without masks."""
        lass = self._lass()
        if lass is None:
            return super().create_optimizer(model)
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(lass))
            params = [(n, p) for n, p in lass.named_parameters() if p.requires_grad]
            groups = [
                {"params": [p for n, p in params if n in decay],
                 "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
            ]
            self.optimizer = MaskedAdamW(
                [g for g in groups if g["params"]], lr=self.args.learning_rate,
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon,
            ).bind(lass, lass.lass_bank)
        self._check_optimizer(self.optimizer)
        return self.optimizer

    # ------------------------------------------------------------------------------- data

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:
        ds = self.train_dataset
        if ds is None:
            raise ValueError("LaSSTrainer: training requires a train_dataset")
        sampler = PairGroupedSampler(
            ds.pair_indices, self._train_batch_size, temperature=self.temperature,
            batches_per_epoch=self.batches_per_epoch, num_replicas=self.args.world_size,
            rank=self.args.process_index, seed=self.args.seed, max_tokens=self.max_tokens,
            lengths=ds.lengths if self.max_tokens else None)
        return self._prepare(torch.utils.data.DataLoader(
            ds, batch_sampler=sampler, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available()))

    def get_eval_dataloader(self, eval_dataset: Any = None) -> torch.utils.data.DataLoader:
        ds = eval_dataset if eval_dataset is not None else self.eval_dataset
        if isinstance(ds, str):
            ds = self.eval_dataset[ds]
        if not isinstance(ds, PairDataset):
            raise TypeError("LaSSTrainer: eval_dataset must be a PairDataset")
        bs = self.args.eval_batch_size
        batches = [idx[i:i + bs] for idx in ds.pair_indices.values()
                   for i in range(0, len(idx), bs)]
        return self._prepare(torch.utils.data.DataLoader(
            ds, batch_sampler=batches, collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers))

    def get_test_dataloader(self, test_dataset: Any) -> torch.utils.data.DataLoader:
        return self.get_eval_dataloader(test_dataset)

    def _prepare(self, dl: torch.utils.data.DataLoader) -> torch.utils.data.DataLoader:
        out = self.accelerator.prepare(dl)
        # our batch sampler is already rank-aware: make accelerate's shard wrapper a passthrough
        shard = getattr(out, "batch_sampler", None)
        if shard is not None and hasattr(shard, "num_processes") and getattr(
                shard, "batch_sampler", None) is dl.batch_sampler:
            shard.num_processes, shard.process_index = 1, 0
        return out

    # ------------------------------------------------------------------------------ steps

    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch: Any = None) -> torch.Tensor:
        inputs = dict(inputs)
        pair = inputs.pop("lass_pair", None)
        lass = self._lass()
        if lass is None:
            return super().training_step(model, inputs, num_items_in_batch)
        if pair is None:
            raise ValueError("LaSSTrainer: a training batch without 'lass_pair' (use "
                             "LaSSCollator with a PairDataset)")
        with lass.use_pair(pair):
            loss = super().training_step(model, inputs, num_items_in_batch)
        self._check_optimizer(self.optimizer).note_pair(*gather_pairs(pair))
        return loss

    def prediction_step(self, model: nn.Module, inputs: dict[str, Any],
                        prediction_loss_only: bool, ignore_keys: list[str] | None = None,
                        **gen_kwargs: Any):
        inputs = dict(inputs)
        pair = inputs.pop("lass_pair", None)
        lass = self._lass()
        if lass is None or pair is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys,
                                           **gen_kwargs)
        with lass.use_pair(pair):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys,
                                           **gen_kwargs)


class LaSSTrainer(LaSSTrainerMixin, Seq2SeqTrainer):
    """``Seq2SeqTrainer`` for LaSS: ``LaSSTrainer(model, args, train_dataset=PairDataset(...),
    temperature=5.0)``; see the module docstring."""
