"""The packed forward pass shared by training, evaluation and the reference pass: pack a bin's pairs, run
the decoder, score the hidden states with the fused head and loss, and reduce metrics over ranks."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn

from fastdpo.distributed import (
    DistState,
    all_reduce_sum,
    gather_metrics,
    shard_bins,
    unsharded_lm_head,
    unwrap_model,
)
from fastdpo.longctx import save_on_host
from fastdpo.losses import FusedLinearDPOLoss, PreferenceLossOutput, sequence_logps
from fastdpo.metarun import meta_autocast
from fastdpo.modeling import packed_hidden_states
from fastdpo.packing import PackedBatch
from fastdpo.train.config import TrainConfig
from fastdpo.train.plan import Split

__all__ = ["METRIC_NAMES", "PackedForward"]

# Per-pair metrics, averaged over the pairs of a step (or of the eval set), under TRL's names. entropy and
# mean_token_accuracy come from the loss's own pass over the vocabulary: each pair's token mean (over its
# tokens; over its chosen ones), so that the average does not depend on how pairs were batched.
METRIC_NAMES = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "entropy",
    "mean_token_accuracy",
)


def _keep_lora_inputs(model: nn.Module) -> None:
    """Stops peft's LoRA layers casting their input to the adapters' fp32 before ``lora_A``.

    Every forward here runs under autocast (:meth:`PackedForward.compute`; checkpoint recomputes restore
    it), which casts that fp32 copy straight back to the compute dtype: the same bits as the uncast input,
    but at long context a transient fp32 ``[N, D]`` and one more saved ``[N, D]`` per adapted projection a
    layer (planned for Llama-3-8B LoRA at 524K tokens with every long-context option: 86.0 GiB peak with
    the casts, 68.1 GiB without).
    """
    for module in model.modules():
        if hasattr(module, "lora_A") and hasattr(module, "_cast_input_dtype"):
            module.cast_input_dtype_enabled = False


class PackedForward:
    """Packs, runs and scores micro-batches of one job: the policy ``model`` (as wrapped for the strategy)
    under ``config``'s compute dtype, attention backend and activation offloading; ``temperature`` and
    ``softcap`` make the fused head compute the model's own logits (``build.logit_transform``)."""

    # The progress bar's name, the per-batch sums ``pair_sums`` returns, and the metrics the progress bar
    # and eval log show.
    name = "dpo"
    metric_names: tuple[str, ...] = METRIC_NAMES
    shown: tuple[str, ...] = ("loss", "rewards/accuracies", "rewards/margins")

    def __init__(
        self,
        config: TrainConfig,
        dist: DistState,
        device: torch.device,
        compute_dtype: torch.dtype,
        model: nn.Module,
        loss_fn: FusedLinearDPOLoss,
        *,
        temperature: float,
        softcap: float | None,
    ) -> None:
        self.config, self.dist, self.device, self.compute_dtype = config, dist, device, compute_dtype
        self.model, self.loss_fn = model, loss_fn
        self.temperature, self.softcap = temperature, softcap
        if compute_dtype != torch.float32:
            _keep_lora_inputs(model)

    def shard(self, bins: Sequence[np.ndarray], tokens: np.ndarray) -> list[tuple[np.ndarray, bool]]:
        """This rank's ``(pair indices, real)`` micro-batches of ``bins``, as many on every rank.

        ``shard_bins`` balances tokens over ranks; a padding micro-batch (``real`` False) reruns a bin so
        that the collectives of all ranks match, and must not count (loss times 0, weight 0).
        """
        plan = shard_bins([int(tokens[b].sum()) for b in bins], self.dist)
        return [(bins[i], True) if i >= 0 else (bins[0], False) for i in plan]

    def batch(self, split: Split, indices: np.ndarray) -> PackedBatch:
        return split.pack(indices, shared_prompt=self.config.shared_prompt).to(self.device)

    @contextmanager
    def compute(self, *, offload: bool = False) -> Iterator[None]:
        """Autocast to the compute dtype; with ``offload``, autograd's saved tensors go to CPU memory."""
        with ExitStack() as stack:
            if self.compute_dtype != torch.float32 and self.device.type == "meta":  # fastdpo plan
                stack.enter_context(meta_autocast(self.compute_dtype))
            elif self.compute_dtype != torch.float32:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.compute_dtype))
            if offload:
                stack.enter_context(save_on_host(self.device))
            yield

    def hidden(self, model: nn.Module, batch: PackedBatch, *, offload: bool = False) -> torch.Tensor:
        """Final hidden states ``[N, D]`` of ``batch`` (the decoder call runs the DDP / FSDP2 forward)."""
        with self.compute(offload=offload):
            return packed_hidden_states(unwrap_model(model), batch, attn_backend=self.config.attn_backend)

    def release(self, model: nn.Module) -> None:
        """Frees FSDP2's gathered root unit after no-grad forwards, which no post-backward reshards."""
        if self.config.strategy == "fsdp2" and model is self.model:
            model.reshard()

    def loss(self, batch: PackedBatch, ref: Mapping[str, Any]) -> PreferenceLossOutput:
        """The policy's fused preference loss on ``batch`` given reference inputs ``ref``."""
        offload = self.config.offload_activations and torch.is_grad_enabled()
        return self._score(self.loss_fn, self.model, batch, offload=offload, **ref)

    def sequence_logps(self, model: nn.Module, batch: PackedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed response log-probs ``(chosen [B], rejected [B])`` of ``batch`` under ``model``."""
        kwargs = {"temperature": self.temperature, "softcap": self.softcap, "backend": self.config.backend}
        return self._score(sequence_logps, model, batch, **kwargs)

    def _score(
        self,
        head: Callable[..., Any],
        model: nn.Module,
        batch: PackedBatch,
        *,
        offload: bool = False,
        **kwargs: Any,
    ) -> Any:
        """``head(hidden, lm_head weight, labels, bias, ...)`` on ``model``'s hidden states of ``batch``."""
        hidden = self.hidden(model, batch, offload=offload)
        with unsharded_lm_head(model) as (weight, bias), self.compute():
            return head(
                hidden,
                weight,
                batch.labels,
                bias,
                seq_index=batch.seq_index,
                num_pairs=batch.num_pairs,
                **kwargs,
            )

    @staticmethod
    def pair_sums(out: PreferenceLossOutput, num_pairs: int) -> torch.Tensor:
        """Sums over the batch's pairs of each of ``METRIC_NAMES``."""
        c, r = out.chosen_rewards, out.rejected_rewards
        return torch.stack(
            [
                out.loss.detach().float() * num_pairs,
                c.sum(),
                r.sum(),
                (c > r).float().sum(),
                (c - r).sum(),
                out.chosen_logps.sum(),
                out.rejected_logps.sum(),
                out.pair_metrics["entropy"].sum(),
                out.pair_metrics["mean_token_accuracy"].sum(),
            ]
        )

    def global_means(self, sums: torch.Tensor, pairs: int) -> dict[str, float]:
        """Means over the pairs of all ranks of ``METRIC_NAMES`` from this rank's ``pairs`` and their sums."""
        local = (sums / pairs).tolist() if pairs else [0.0] * len(METRIC_NAMES)
        means = gather_metrics(dict(zip(METRIC_NAMES, local, strict=True)), pairs)
        return {k: means[k] for k in METRIC_NAMES}

    def agree(self, ok: bool, what: str) -> None:
        """Waits for every rank; raises on every rank if ``what`` failed on another one."""
        if self.dist.world_size == 1:
            return
        failed = all_reduce_sum(int(not ok))
        if failed and ok:
            raise RuntimeError(f"{what} failed on {failed} other rank(s); see their errors")
