"""Glue between Hugging Face causal LMs and packed batches: hidden states without attention leaks.

A packed bin puts several sequences into one row of ``N`` tokens. Resetting ``position_ids`` fixes the
rotary positions, but transformers only infers sequence boundaries from them on some code paths (not,
for instance, when a KV cache is passed), and a shared-prompt layout needs a segment to see a prefix of
another one, which no position-based rule can express. :func:`packed_hidden_states` therefore hands
the decoder an explicit visibility rule in the form the model's attention implementation understands:

* ``"flash"``: flash-attn varlen, driven by ``cu_seqlens`` (plain packing only).
* ``"flex"``: a FlexAttention ``BlockMask`` built from :func:`packed_mask_mod` (natural on GPU).
* ``"sdpa"``: a dense ``[1, 1, N, N]`` bool mask, ``True`` where attention is allowed.
* ``"eager"``: the same mask as an additive float mask (``0`` / ``finfo.min``); eager attention adds the
  mask to the scores, so a bool mask would be silently wrong there.

The dense masks take O(N^2) memory: fine on CPU and for short bins, use ``"flex"`` or ``"flash"`` for long
bins on GPU.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import nn

from fastdpo.metarun import planning_for
from fastdpo.ops.packed_attention import ATTENTION_NAME, register_attention
from fastdpo.packing import PackedBatch

__all__ = [
    "ATTN_BACKENDS",
    "lm_head_params",
    "packed_attention_mask",
    "packed_hidden_states",
    "packed_mask_mod",
    "reference_context",
    "resolve_attn_backend",
]

ATTN_BACKENDS = ("flash", "flex", "sdpa", "eager", "packed")

# The transformers attention implementation each backend runs under.
_BACKEND_IMPL = {
    "flash": "flash_attention_2",
    "flex": "flex_attention",
    "sdpa": "sdpa",
    "eager": "eager",
    "packed": ATTENTION_NAME,
}

MaskMod = Callable[[Any, Any, torch.Tensor, torch.Tensor], torch.Tensor]


def _peft_model_class() -> type | None:
    # A model can only be a PeftModel if peft was imported by whoever built it, so avoid importing it here.
    peft = sys.modules.get("peft")
    return getattr(peft, "PeftModel", None) if peft is not None else None


def _is_peft_model(model: nn.Module) -> bool:
    cls = _peft_model_class()
    return cls is not None and isinstance(model, cls)


def _unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """Returns ``(causal_lm, decoder)``: the transformers model under any peft wrapper and its decoder."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch.nn.Module (a transformers causal LM), got {type(model).__name__}"
        )
    lm = model
    if _is_peft_model(model):
        if model.active_peft_config.is_prompt_learning:
            raise ValueError(
                "prompt-learning peft adapters (prefix/prompt tuning) add virtual tokens that packed batches "
                "cannot carry; use a weight adapter such as LoRA"
            )
        lm = model.get_base_model()
    get_decoder = getattr(lm, "get_decoder", None)
    if get_decoder is None:
        raise TypeError(
            f"expected a transformers PreTrainedModel with get_decoder(), got {type(lm).__name__}"
        )
    return lm, get_decoder()


def _backend_of_impl(impl: str | None) -> str | None:
    if impl is None:
        return None
    if impl == ATTENTION_NAME:
        return "packed"
    if impl == "flex_attention":
        return "flex"
    if impl in ("sdpa", "eager"):
        return impl
    if "flash" in impl:
        return "flash"
    return None


def _flash_usable(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    from transformers.utils import is_flash_attn_2_available

    return is_flash_attn_2_available()


def _model_device(decoder: nn.Module) -> torch.device:
    return decoder.get_input_embeddings().weight.device


def resolve_attn_backend(model: nn.Module, *, shared_prompt: bool, attn_backend: str | None = None) -> str:
    """Picks the attention backend :func:`packed_hidden_states` uses for ``model``.

    With ``attn_backend=None`` the backend follows the model's ``config._attn_implementation``
    (``flash_attention_*`` -> ``"flash"``, ``flex_attention`` -> ``"flex"``, ``sdpa``, ``eager``). Flash
    varlen attention cannot express shared-prompt prefixes, so ``"flash"`` falls back to ``"flex"`` for
    shared-prompt batches (with a warning); a model configured for flash but not on CUDA or without
    flash-attn installed falls back to ``"sdpa"``.

    Args:
        model: A transformers causal LM, optionally wrapped by peft.
        shared_prompt: Whether the batches carry shared-prompt prefixes (``PackedBatch.has_shared_prompt``).
        attn_backend: ``None`` for automatic, or one of ``ATTN_BACKENDS`` to request a backend.

    Returns:
        One of ``"flash"``, ``"flex"``, ``"sdpa"``, ``"eager"``.

    Raises:
        ValueError: Unknown ``attn_backend``; ``"flash"`` requested without flash-attn on CUDA; or an
            automatic pick for an attention implementation fastdpo has no packed mask for.
    """
    if attn_backend is not None and attn_backend not in ATTN_BACKENDS:
        raise ValueError(f"attn_backend must be None or one of {ATTN_BACKENDS}, got {attn_backend!r}")
    _, decoder = _unwrap(model)
    impl = getattr(decoder.config, "_attn_implementation", None)
    if _model_device(decoder).type == "meta":
        return _planned_backend(attn_backend or _backend_of_impl(impl))
    backend = attn_backend or _backend_of_impl(impl)
    if backend is None:
        raise ValueError(
            f"no packed attention mask for attention implementation {impl!r}; pass attn_backend as one of "
            f"{ATTN_BACKENDS}"
        )
    if backend == "flash":
        if not _flash_usable(_model_device(decoder)):
            if attn_backend == "flash":
                raise ValueError(
                    "attn_backend='flash' needs the flash-attn package and the model on a CUDA device"
                )
            backend = "sdpa"
        elif shared_prompt:
            warnings.warn(
                "flash-attn varlen cannot express shared-prompt prefixes; using flex attention instead",
                stacklevel=2,
            )
            backend = "flex"
    return backend


def _planned_backend(backend: str | None) -> str:
    """The backend of a meta run (fastdpo plan): the packed op stands in for flash-attn and flex attention
    (both hold out and lse, no mask) when planning for CUDA; the CPU runs what the model is set up for."""
    if planning_for() == "cuda" and backend in (None, "flash", "flex"):
        return "packed"
    return backend or "sdpa"


def packed_mask_mod(batch: PackedBatch) -> MaskMod:
    """Returns a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)``, True where ``q_idx`` may see ``kv_idx``.

    Token ``q`` sees token ``k`` iff ``segment[q] == segment[k] and k <= q``, or ``k`` lies in the first
    ``prefix_len[segment[q]]`` tokens of segment ``prefix_segment[segment[q]]`` (the shared prompt). The
    function only indexes and compares tensors, so it also evaluates on broadcast index grids.

    Args:
        batch: The packed bin; only ``segment_ids``, ``cu_seqlens``, ``prefix_segment`` and ``prefix_len``
            are read.

    Returns:
        The mask function, closing over per-token tensors on the batch's device.
    """
    _check_layout(batch)
    seg = batch.segment_ids
    tok = torch.arange(seg.numel(), device=seg.device)
    # Per-token lookups keep the mask function to a handful of gathers, which matters for compiled flex.
    offset = tok - batch.cu_seqlens[:-1].to(torch.long)[seg]
    q_prefix_seg = batch.prefix_segment[seg]
    q_prefix_len = batch.prefix_len[seg]

    def mask_mod(b: Any, h: Any, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        seg_k = seg[kv_idx]
        own = (seg[q_idx] == seg_k) & (kv_idx <= q_idx)
        shared = (q_prefix_seg[q_idx] == seg_k) & (offset[kv_idx] < q_prefix_len[q_idx])
        return own | shared

    return mask_mod


def packed_attention_mask(batch: PackedBatch) -> torch.Tensor:
    """Dense ``[N, N]`` bool visibility mask, ``mask[q, k]`` as :func:`packed_mask_mod` defines it.

    Args:
        batch: The packed bin.

    Returns:
        Bool tensor ``[N, N]`` on the batch's device, True where attention is allowed.
    """
    mask_mod = packed_mask_mod(batch)
    idx = torch.arange(batch.segment_ids.numel(), device=batch.segment_ids.device)
    return mask_mod(None, None, idx[:, None], idx[None, :])


def _check_layout(batch: PackedBatch) -> None:
    if not isinstance(batch, PackedBatch):
        raise TypeError(f"batch must be a fastdpo.packing.PackedBatch, got {type(batch).__name__}")
    n = batch.input_ids.numel()
    if batch.input_ids.dim() != 1 or n == 0:
        raise ValueError(
            f"batch.input_ids must be a non-empty 1-D [N] tensor, got shape {tuple(batch.input_ids.shape)}"
        )
    for name in ("position_ids", "segment_ids"):
        value = getattr(batch, name)
        if value.shape != batch.input_ids.shape:
            raise ValueError(f"batch.{name} must have shape [N]={n}, got {tuple(value.shape)}")
    num_segments = batch.cu_seqlens.numel() - 1
    if batch.cu_seqlens.dim() != 1 or num_segments < 1:
        raise ValueError(
            f"batch.cu_seqlens must be 1-D [S+1] with S >= 1, got shape {tuple(batch.cu_seqlens.shape)}"
        )
    for name in ("prefix_segment", "prefix_len"):
        value = getattr(batch, name)
        if value.shape != (num_segments,):
            raise ValueError(f"batch.{name} must have shape [S]={num_segments}, got {tuple(value.shape)}")


def _use_backend(lm: nn.Module, decoder: nn.Module, backend: str) -> None:
    if backend == "packed":
        register_attention()
    # The switch is persistent on purpose: gradient checkpointing re-runs the layers during backward, after
    # this call returns, and the recomputation must see the implementation the mask was built for.
    if _backend_of_impl(decoder.config._attn_implementation) != backend:
        lm.set_attn_implementation(_BACKEND_IMPL[backend])


def _check_sliding_window(decoder: nn.Module, batch: PackedBatch) -> None:
    window = getattr(decoder.config, "sliding_window", None)
    # A token at position p attends to positions 0..p; a window only cuts that short once p >= window.
    if isinstance(window, int) and batch.num_tokens > window and int(batch.position_ids.max()) >= window:
        raise ValueError(
            f"the model uses sliding-window attention (window {window}) and a packed sequence is longer than "
            "the window; packed masks for flex/sdpa/eager do not apply the window, so use "
            "attn_backend='flash' or shorter sequences"
        )


def packed_hidden_states(
    model: nn.Module, batch: PackedBatch, *, attn_backend: str | None = None
) -> torch.Tensor:
    """Final hidden states of ``model``'s decoder on a packed bin, each token seeing only its own context.

    Equals, per sequence, ``model.get_decoder()(seq_ids[None]).last_hidden_state[0]`` of the unpacked
    sequence (prompt + response) at the tokens that sequence owns. Runs the decoder once on
    ``batch.input_ids[None]`` with ``batch.position_ids[None]`` and the visibility rule of
    :func:`packed_mask_mod` in the backend's form. Differentiable, and works with gradient checkpointing.

    If the chosen backend differs from the model's ``config._attn_implementation``, the model is switched to
    it with ``set_attn_implementation`` and stays switched.

    Args:
        model: A transformers causal LM (``LlamaForCausalLM`` and alike), optionally peft-wrapped.
        batch: The packed bin, on the model's device.
        attn_backend: ``None`` to pick with :func:`resolve_attn_backend`, or one of ``ATTN_BACKENDS``.

    Returns:
        ``[N, D]`` hidden states after the decoder's final norm, in the model's compute dtype.

    Raises:
        TypeError: ``model`` is not a transformers model or ``batch`` is not a ``PackedBatch``.
        ValueError: Malformed batch, batch on another device than the model, an unusable backend, or a
            sliding-window model with sequences longer than its window on a mask-based backend.
    """
    _check_layout(batch)
    lm, decoder = _unwrap(model)
    device = _model_device(decoder)
    if batch.input_ids.device != device:
        raise ValueError(
            f"batch is on {batch.input_ids.device} but the model is on {device}; call batch.to(device)"
        )
    backend = resolve_attn_backend(model, shared_prompt=batch.has_shared_prompt, attn_backend=attn_backend)
    _use_backend(lm, decoder, backend)

    extra: dict[str, Any] = {}
    mask: Any = None
    if backend in ("flash", "packed"):
        cu_seqlens = batch.cu_seqlens.to(torch.int32)
        max_len = batch.max_seqlen
        extra = {
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": max_len,
            "max_length_k": max_len,
        }
    else:
        _check_sliding_window(decoder, batch)
        if backend == "flex":
            from torch.nn.attention.flex_attention import create_block_mask

            n = batch.num_tokens
            # Compiling the block-mask construction avoids materialising an [N, N] mask on GPU.
            mask = create_block_mask(
                packed_mask_mod(batch), None, None, n, n, device=device, _compile=device.type == "cuda"
            )
        else:
            dense = packed_attention_mask(batch)[None, None]
            if backend == "sdpa":
                mask = dense
            else:
                dtype = decoder.get_input_embeddings().weight.dtype
                mask = torch.zeros(dense.shape, dtype=dtype, device=device).masked_fill_(
                    ~dense, torch.finfo(dtype).min
                )

    out = decoder(
        input_ids=batch.input_ids[None],
        position_ids=batch.position_ids[None],
        attention_mask=mask,
        use_cache=False,
        **extra,
    )
    return out.last_hidden_state[0]


def lm_head_params(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns ``(weight [V, D], bias [V] or None)`` of ``model.get_output_embeddings()``, the lm_head.

    With tied embeddings the weight is the input embedding's Parameter itself. For a peft model with
    ``lm_head`` in ``modules_to_save`` the active copy is returned, so call this inside
    :func:`reference_context` to get the reference head.

    Args:
        model: A transformers causal LM, optionally peft-wrapped.

    Returns:
        The head's weight and bias (``None`` when it has none).

    Raises:
        TypeError: The model has no output embedding.
        ValueError: The head carries an active, unmerged peft adapter (its plain weight would be wrong).
    """
    lm, _ = _unwrap(model)
    head = lm.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise TypeError(f"{type(lm).__name__} has no output embedding (lm_head) with a weight")
    if hasattr(head, "base_layer") and not (
        getattr(head, "disable_adapters", False) or getattr(head, "merged", False)
    ):
        raise ValueError(
            "lm_head carries an active peft adapter, so its weight alone is not the effective head; leave "
            "lm_head out of target_modules (use modules_to_save to train it)"
        )
    bias = getattr(head, "bias", None)
    return head.weight, bias if isinstance(bias, torch.Tensor) else None


def reference_context(model: nn.Module) -> AbstractContextManager[None]:
    """Context manager under which ``model`` is its own reference: ``model.disable_adapter()`` for peft.

    Args:
        model: A peft-wrapped model.

    Returns:
        The context manager; inside it the adapters are disabled.

    Raises:
        TypeError: ``model`` is not a peft model, so there is no adapter to switch off; use a separate
            reference model or precomputed reference log-probs.
    """
    if not _is_peft_model(model):
        raise TypeError(
            f"reference_context needs a peft model (adapters to disable), got {type(model).__name__}; for a "
            "full fine-tune use a separate reference model or precomputed reference log-probs"
        )
    return model.disable_adapter()
