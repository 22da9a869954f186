"""Packed forwards through a tiny random Llama must equal separate, unpacked forwards of every sequence."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from fastdpo.modeling import (
    lm_head_params,
    packed_attention_mask,
    packed_hidden_states,
    packed_mask_mod,
    reference_context,
    resolve_attn_backend,
)
from fastdpo.packing import IGNORE_INDEX, pack_pairs

VOCAB = 128


def tiny_llama(attn_implementation: str = "sdpa", **overrides: object) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=256,
        attn_implementation=attn_implementation,
        **overrides,
    )
    return LlamaForCausalLM(config).eval()


def random_pairs(
    num_pairs: int, generator: torch.Generator, min_prompt: int = 1
) -> list[dict[str, list[int]]]:
    def ids(lo: int, hi: int) -> list[int]:
        n = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        return torch.randint(0, VOCAB, (n,), generator=generator).tolist()

    return [
        {"prompt_ids": ids(min_prompt, 9), "chosen_ids": ids(1, 7), "rejected_ids": ids(1, 7)}
        for _ in range(num_pairs)
    ]


def reference_logps(model: LlamaForCausalLM, pairs: list[dict[str, list[int]]]) -> torch.Tensor:
    """[2B] float64 log-probs of each response from separate unpadded forwards of a float64 eager copy."""
    ref = copy.deepcopy(model).double()
    ref.set_attn_implementation("eager")
    device = ref.lm_head.weight.device
    out = []
    with torch.no_grad():
        for key in ("chosen_ids", "rejected_ids"):
            for pair in pairs:
                prompt, response = pair["prompt_ids"], pair[key]
                seq = torch.tensor(prompt + response, device=device)
                logits = ref(input_ids=seq[None], use_cache=False).logits[0]
                logp = logits[:-1].log_softmax(-1).gather(-1, seq[1:, None])[:, 0]
                out.append(logp[len(prompt) - 1 :].sum())
    return torch.stack(out).cpu()


def packed_logps(model: LlamaForCausalLM, hidden: torch.Tensor, batch) -> torch.Tensor:
    """[2B] per-sequence sums of log_softmax(lm_head(hidden)) at the packed labels."""
    keep = batch.labels != IGNORE_INDEX
    logits = hidden[keep].detach().to(torch.float64) @ model.lm_head.weight.detach().to(torch.float64).T
    tok = logits.log_softmax(-1).gather(-1, batch.labels[keep, None])[:, 0]
    out = torch.zeros(2 * batch.num_pairs, dtype=torch.float64, device=hidden.device)
    return out.index_add(0, batch.seq_index[keep], tok).cpu()


def expected_mask(pairs: list[dict[str, list[int]]], shared_prompt: bool) -> torch.Tensor:
    """Visibility from the pairs' lengths alone: sequences causal, shared rejects also see the prompt."""
    blocks = []  # (start, length, prefix_start, prefix_length)
    start = 0
    for pair in pairs:
        p, c, r = len(pair["prompt_ids"]), len(pair["chosen_ids"]), len(pair["rejected_ids"])
        blocks.append((start, p + c, 0, 0))
        chosen_start = start
        start += p + c
        if shared_prompt:
            blocks.append((start, 1 + r, chosen_start, p - 1))
            start += 1 + r
        else:
            blocks.append((start, p + r, 0, 0))
            start += p + r
    mask = torch.zeros(start, start, dtype=torch.bool)
    for s, n, ps, pn in blocks:
        mask[s : s + n, s : s + n] = torch.ones(n, n, dtype=torch.bool).tril()
        mask[s : s + n, ps : ps + pn] = True
    return mask


@pytest.fixture
def generator() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, (1,))))


@pytest.mark.parametrize("shared_prompt", [False, True])
def test_dense_mask_and_mask_mod_match_pair_layout(generator: torch.Generator, shared_prompt: bool) -> None:
    from torch.nn.attention.flex_attention import create_mask

    pairs = random_pairs(4, generator)
    batch = pack_pairs(pairs, shared_prompt=shared_prompt)
    expected = expected_mask(pairs, shared_prompt)
    dense = packed_attention_mask(batch)
    assert dense.dtype == torch.bool
    assert torch.equal(dense, expected)
    n = batch.num_tokens
    assert torch.equal(create_mask(packed_mask_mod(batch), None, None, n, n, device="cpu")[0, 0], expected)


def eager_flex_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs transformers' flex path with the uncompiled op, for CPU tests.

    transformers wraps flex_attention in torch.compile; inductor's CPU codegen for it takes ~20 s per new
    shape and fails to build dynamic-shape kernels. The eager op computes the same attention and still
    consumes the BlockMask built by fastdpo.
    """
    import transformers.integrations.flex_attention as hf_flex
    from torch.nn.attention.flex_attention import flex_attention

    def uncompiled(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", uncompiled)


@pytest.mark.parametrize("backend", ["sdpa", "eager", "flex"])
@pytest.mark.parametrize("shared_prompt", [False, True])
def test_packed_logps_equal_unpacked(
    generator: torch.Generator, monkeypatch: pytest.MonkeyPatch, backend: str, shared_prompt: bool
) -> None:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    if backend == "flex":
        eager_flex_attention(monkeypatch)
    model = tiny_llama()
    pairs = random_pairs(3, generator)
    batch = pack_pairs(pairs, shared_prompt=shared_prompt)
    # FlexAttention has no CPU backward; the other backends run with autograd on, as in training.
    with torch.set_grad_enabled(backend != "flex"):
        hidden = packed_hidden_states(model, batch, attn_backend=backend)
    assert hidden.shape == (batch.num_tokens, model.config.hidden_size)
    assert hidden.dtype == torch.float32
    got = packed_logps(model, hidden, batch)
    torch.testing.assert_close(got, reference_logps(model, pairs), rtol=0, atol=1e-5)
    assert resolve_attn_backend(model, shared_prompt=shared_prompt) == backend


def test_position_ids_alone_are_not_enough(generator: torch.Generator) -> None:
    model = tiny_llama()
    decoder = model.get_decoder()

    # Plain packing under one causal mask: later sequences see earlier ones.
    pairs = random_pairs(3, generator, min_prompt=2)
    batch = pack_pairs(pairs, shared_prompt=False)
    causal = torch.ones(batch.num_tokens, batch.num_tokens, dtype=torch.bool).tril()[None, None]
    with torch.no_grad():
        leaky = decoder(
            input_ids=batch.input_ids[None],
            position_ids=batch.position_ids[None],
            attention_mask=causal,
            use_cache=False,
        ).last_hidden_state[0]
    diff = (packed_logps(model, leaky, batch) - reference_logps(model, pairs))[1:].abs().max()
    assert diff > 1e-3

    # Shared prompts cannot be described by positions: rejected responses come out wrong.
    batch = pack_pairs(pairs, shared_prompt=True)
    with torch.no_grad():
        naive = decoder(
            input_ids=batch.input_ids[None], position_ids=batch.position_ids[None], use_cache=False
        ).last_hidden_state[0]
    wrong = (packed_logps(model, naive, batch) - reference_logps(model, pairs))[3:].abs()
    assert wrong.min() > 1e-4


def test_gradient_checkpointing_backward_matches_unpacked(generator: torch.Generator) -> None:
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    model = tiny_llama().train()
    plain = copy.deepcopy(model)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    pairs = random_pairs(3, generator)
    batch = pack_pairs(pairs, shared_prompt=True)

    hidden = packed_hidden_states(model, batch, attn_backend="sdpa")
    keep = batch.labels != IGNORE_INDEX
    logits = model.lm_head(hidden[keep]).float()
    logits.log_softmax(-1).gather(-1, batch.labels[keep, None]).sum().backward()

    total = torch.zeros(())
    for key in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            seq = torch.tensor(pair["prompt_ids"] + pair[key])
            logp = plain(input_ids=seq[None], use_cache=False).logits[0, :-1].log_softmax(-1)
            total = total + logp.gather(-1, seq[1:, None])[len(pair["prompt_ids"]) - 1 :].sum()
    total.backward()

    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_backend_resolution(generator: torch.Generator) -> None:
    model = tiny_llama("eager")
    assert resolve_attn_backend(model, shared_prompt=True) == "eager"
    batch = pack_pairs(random_pairs(2, generator), shared_prompt=False)
    with torch.no_grad():
        packed_hidden_states(model, batch, attn_backend="sdpa")
    # The switch persists so that gradient-checkpointing recomputation sees the same attention.
    assert model.config._attn_implementation == "sdpa"

    model.config._attn_implementation = "flash_attention_2"
    assert resolve_attn_backend(model, shared_prompt=False) == "sdpa"
    with pytest.raises(ValueError, match="flash-attn"):
        resolve_attn_backend(model, shared_prompt=False, attn_backend="flash")
    with pytest.raises(ValueError, match="attn_backend"):
        resolve_attn_backend(model, shared_prompt=False, attn_backend="dense")
    model.config._attn_implementation = "some_custom_kernel"
    with pytest.raises(ValueError, match="some_custom_kernel"):
        resolve_attn_backend(model, shared_prompt=False)


def test_bad_inputs(generator: torch.Generator) -> None:
    model = tiny_llama()
    batch = pack_pairs(random_pairs(2, generator), shared_prompt=False)
    with pytest.raises(TypeError, match="PackedBatch"):
        packed_hidden_states(model, {"input_ids": batch.input_ids})
    with pytest.raises(TypeError, match="nn.Module"):
        packed_hidden_states("model", batch)
    with pytest.raises(ValueError, match="meta"):
        packed_hidden_states(model, batch.to("meta"))
    broken = copy.copy(batch)
    broken.position_ids = batch.position_ids[:-1]
    with pytest.raises(ValueError, match="position_ids"):
        packed_hidden_states(model, broken)
    broken = copy.copy(batch)
    broken.prefix_len = batch.prefix_len[:-1]
    with pytest.raises(ValueError, match="prefix_len"):
        packed_attention_mask(broken)


def test_sliding_window_longer_than_window_is_refused(generator: torch.Generator) -> None:
    config = MistralConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        sliding_window=4,
    )
    model = MistralForCausalLM(config).eval()
    pairs = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]}]
    with pytest.raises(ValueError, match="sliding-window"):
        packed_hidden_states(model, pack_pairs(pairs, shared_prompt=False))
    short = [{"prompt_ids": [1, 2], "chosen_ids": [4], "rejected_ids": [6]}]
    with torch.no_grad():
        hidden = packed_hidden_states(model, pack_pairs(short, shared_prompt=False))
    assert hidden.shape == (6, 64)


@pytest.mark.parametrize("tie", [False, True])
def test_lm_head_params(tie: bool) -> None:
    model = tiny_llama(tie_word_embeddings=tie)
    weight, bias = lm_head_params(model)
    assert weight is model.lm_head.weight
    assert isinstance(weight, nn.Parameter)
    assert (weight is model.model.embed_tokens.weight) == tie
    assert bias is None

    model.lm_head = nn.Linear(64, VOCAB, bias=True)
    weight, bias = lm_head_params(model)
    assert weight is model.lm_head.weight and bias is model.lm_head.bias

    with pytest.raises(TypeError, match="output embedding"):
        lm_head_params(model.get_decoder())


def test_peft_adapters_and_reference_context(generator: torch.Generator) -> None:
    peft = pytest.importorskip("peft")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    base = tiny_llama()
    original = copy.deepcopy(base)
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model = peft.get_peft_model(base, lora)
    batch = pack_pairs(random_pairs(3, generator), shared_prompt=True)

    with torch.no_grad():
        adapted = packed_hidden_states(model, batch)
        with reference_context(model):
            reference = packed_hidden_states(model, batch)
            head, _ = lm_head_params(model)
        expected = packed_hidden_states(original, batch)
    torch.testing.assert_close(reference, expected, rtol=0, atol=1e-5)
    assert (adapted - expected).abs().max() > 1e-3
    assert head is base.lm_head.weight

    with pytest.raises(TypeError, match="peft"):
        reference_context(original)

    head_lora = peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="lm_head"):
        lm_head_params(peft.get_peft_model(tiny_llama(), head_lora))


def require_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("shared_prompt", [False, True])
def test_gpu_packed_forward_and_backward(
    generator: torch.Generator, backend: str, shared_prompt: bool
) -> None:
    require_cuda()
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    model = tiny_llama().cuda().train()
    pairs = random_pairs(4, generator)
    batch = pack_pairs(pairs, shared_prompt=shared_prompt).to("cuda")
    hidden = packed_hidden_states(model, batch, attn_backend=backend)
    torch.testing.assert_close(
        packed_logps(model, hidden, batch), reference_logps(model, pairs), rtol=0, atol=1e-4
    )
    hidden.square().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.get_decoder().parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("shared_prompt", [False, True])
def test_gpu_flash_varlen_matches_unpacked(generator: torch.Generator, shared_prompt: bool) -> None:
    require_cuda()
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available():
        pytest.skip("needs flash-attn")
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    model = tiny_llama("flash_attention_2").to("cuda", torch.bfloat16)
    pairs = random_pairs(4, generator)
    batch = pack_pairs(pairs, shared_prompt=shared_prompt).to("cuda")
    expected_backend = "flex" if shared_prompt else "flash"
    assert resolve_attn_backend(model, shared_prompt=shared_prompt) == expected_backend
    with torch.no_grad():
        hidden = packed_hidden_states(model, batch)
        model.set_attn_implementation("flash_attention_2")
        # Unpacked forwards of each sequence; packed tokens are matched by (sequence, position).
        seg = batch.segment_ids.cpu()
        pos = batch.position_ids.cpu()
        for s in range(batch.cu_seqlens.numel() - 1):
            pair = pairs[s // 2]
            key = "chosen_ids" if s % 2 == 0 else "rejected_ids"
            seq = torch.tensor(pair["prompt_ids"] + pair[key], device="cuda")
            full = model.get_decoder()(input_ids=seq[None], use_cache=False).last_hidden_state[0]
            rows = (seg == s).nonzero()[:, 0]
            torch.testing.assert_close(hidden[rows], full[pos[rows]], rtol=2e-2, atol=2e-2)
