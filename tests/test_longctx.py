"""Long-context memory mechanisms: each gives today's numbers (CPU) and shows its effect in the plan."""

import dataclasses

import pytest
import torch

from fastdpo.longctx import (
    ALLOC_CONF,
    auto_tile_tokens,
    default_alloc_conf,
    install_long_context,
    tiled_rows,
)
from fastdpo.planner.api import auto_tile_tokens_from_plan, largest_free_tile, plan_memory
from fastdpo.planner.step import build_policy
from fastdpo.train.build import build_optimizer
from fastdpo.train.config import TrainConfig

TINY = {
    "model_type": "llama",
    "vocab_size": 311,
    "hidden_size": 48,
    "intermediate_size": 136,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}
FLAGS = ("tiled_mlp", "lean_norms", "offload_checkpoints")


def _model_config():
    from transformers import AutoConfig

    config = AutoConfig.for_model(**TINY)
    config._attn_implementation = "sdpa"
    return config


def _config(**overrides) -> TrainConfig:
    options = dict(
        model="tiny", data="-", output_dir="unused", device="cpu", max_length=96, max_prompt_length=40,
        tokens_per_step=700, lora_r=4, lora_dropout=0.0, gradient_checkpointing=True,
        reference="precompute", attn_backend="packed", tile_tokens=64,
    )  # fmt: skip
    return TrainConfig.from_dict({**options, **overrides})


def test_tiled_rows_equals_the_untiled_call():
    """Forward and input gradient bit for bit on CPU for tiles of 128+ rows (smaller ones take other BLAS
    kernels: measured here within 3e-7 of the largest value); parameter gradients to fp32 summation rounding
    (measured: at most 8e-7)."""
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(24, 56), torch.nn.SiLU(), torch.nn.Linear(56, 24))
    x = torch.randn(3, 107, 24, requires_grad=True)
    grad = torch.randn(3, 107, 24)
    want = mlp(x)
    want_grads = torch.autograd.grad(want, [x, *mlp.parameters()], grad)

    def rel(a, b):
        return ((a - b).abs().max() / b.abs().max()).item()

    for tile in (1, 64, 128, 321, 1000):  # ragged last tile, one tile, more rows than the input
        got = tiled_rows(mlp, x, list(mlp.parameters()), tile)
        got_grads = torch.autograd.grad(got, [x, *mlp.parameters()], grad)
        if tile >= 128:
            assert torch.equal(got, want) and torch.equal(got_grads[0], want_grads[0]), tile
        assert rel(got, want) < 1e-6 and rel(got_grads[0], want_grads[0]) < 1e-6, tile
        assert max(rel(g, w) for g, w in zip(got_grads[1:], want_grads[1:], strict=True)) < 4e-6, tile


def test_tiled_rows_runs_each_parameter_accumulation_once():
    """One AccumulateGrad per parameter a backward, as DDP's reducer and FSDP2's hooks expect."""
    lin = torch.nn.Linear(8, 8)
    calls = []
    for p in lin.parameters():
        p.register_post_accumulate_grad_hook(lambda p: calls.append(p))
    tiled_rows(lin, torch.randn(100, 8), list(lin.parameters()), 16).sum().backward()
    assert len(calls) == 2


@pytest.mark.parametrize("rows", [17, 40, 64, 71, 130])
def test_a_planned_tiled_call_peaks_as_every_tile_run_for_real(rows):
    """On meta only the first tiles and the last run (``_tile_starts``); the live-bytes peaks of forward
    and backward still equal those of every tile run on CPU, byte for byte, from 3 to 17 tiles."""
    from fastdpo.memtrack import LiveBytes

    def peaks(device):
        lin = torch.nn.Linear(24, 56, device=device)
        lin.weight.requires_grad_(False)  # a frozen base weight beside a trainable bias, as LoRA has
        mlp = torch.nn.Sequential(lin, torch.nn.SiLU(), torch.nn.Linear(56, 24, device=device))
        params = [p for p in mlp.parameters() if p.requires_grad]
        x = torch.randn(rows, 24, device=device, requires_grad=True)
        grad = torch.randn(rows, 24, device=device)
        found = []
        for phase in ("forward", "backward"):
            with LiveBytes(exclude=list(mlp.parameters())) as tracker:
                if phase == "forward":
                    y = tiled_rows(mlp, x, params, 8)
                else:
                    grads = torch.autograd.grad(y, [x, *params], grad)
            found.append(tracker.peak.bytes)
        assert grads[0].shape == x.shape
        return found

    assert peaks("meta") == peaks("cpu")


def test_auto_tile_tokens_and_bad_tile():
    assert auto_tile_tokens(4096, 524_288) == 4096
    assert auto_tile_tokens(4096, 1000) == 1024
    assert auto_tile_tokens(48, 700) % 64 == 0
    with pytest.raises(ValueError, match="tile_tokens"):
        tiled_rows(torch.nn.Identity(), torch.randn(4, 4), [], -1)


def test_largest_free_tile_stops_where_the_peak_rises():
    peaks = {64: 10, 128: 10, 256: 10, 512: 11, 1024: 10}
    assert largest_free_tile(peaks.__getitem__, 64, 4096) == 256  # 1024 is not tried past the rise
    assert largest_free_tile(lambda t: 10, 64, 4096) == 1024  # at most 16x the rule's tile
    assert largest_free_tile(lambda t: 10, 64, 200) == 128  # and never past the step's rows


def test_tile_tokens_auto_is_the_largest_tile_the_plan_finds_free(caplog):
    """``tile_tokens: auto`` plans the rule's tile and its doublings: the chosen tile's plan is no higher
    than the rule's, and the next one up (if tried) is higher."""
    config = _config(tiled_mlp=True, lean_norms=True, tile_tokens="auto")
    with caplog.at_level("INFO", logger="fastdpo"):
        chosen = auto_tile_tokens_from_plan(config, "cpu", _model_config()).tile_tokens
    assert "tile_tokens auto:" in caplog.text
    base = auto_tile_tokens(TINY["hidden_size"], config.tokens_per_step)

    def peak(tile: int) -> int:
        planned = dataclasses.replace(config, tile_tokens=tile)
        return plan_memory(planned, model_config=_model_config(), device="cpu").peak_bytes

    assert chosen % base == 0 and peak(chosen) <= peak(base)
    if 2 * chosen <= min(16 * base, config.tokens_per_step):
        assert peak(2 * chosen) > peak(base)


def _loss_and_grads(config: TrainConfig):
    torch.manual_seed(0)
    model = build_policy(config, _model_config(), torch.device("cpu"))
    torch.manual_seed(1)
    with torch.no_grad():  # LoRA's B starts at zero, which would leave A without a gradient to compare
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn_like(p) * 0.1)
    model.train()
    ids = torch.randint(0, TINY["vocab_size"], (1, 300))
    position_ids = torch.cat([torch.arange(170), torch.arange(130)])[None]
    logits = model(input_ids=ids, position_ids=position_ids).logits
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("flags", [(f,) for f in FLAGS] + [FLAGS])
def test_mechanisms_give_todays_numbers(flags):
    """LoRA on every projection, gradient checkpointing: the loss and every gradient as without them."""
    want_loss, want = _loss_and_grads(_config())
    got_loss, got = _loss_and_grads(_config(**dict.fromkeys(flags, True)))
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=0)
    assert got.keys() == want.keys()
    worst = max(((got[n] - want[n]).abs().max() / want[n].abs().max()).item() for n in want)
    assert worst < 1e-5, (flags, worst)
    if flags == ("offload_checkpoints",):  # nothing is recomputed differently: the same bits
        assert all(torch.equal(got[n], want[n]) for n in want)


def test_tiles_survive_transformers_rekernelizing_on_train_eval(tmp_path):
    """transformers 5.25 loads with ``use_kernels`` on and re-kernelizes at each train/eval switch, which
    pops instance forwards: the tiles must still be there after it (they were gone before the fix)."""
    from transformers import AutoModelForCausalLM

    build_policy(_config(lora_r=0), _model_config(), torch.device("cpu")).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    install_long_context(model, tiled_mlp=True, lean_norms=True)
    model.train()
    model.eval()
    model.train()
    assert sum("forward" in vars(m) for m in model.modules()) == 3 + 7


def test_install_counts_and_needs_checkpointing():
    model = build_policy(_config(), _model_config(), torch.device("meta"))
    changed = install_long_context(model, tiled_mlp=True, lean_norms=True, offload_checkpoints=True)
    # 3 MLPs; norms: 2 a layer + the final one; every layer offloaded
    assert changed == {"mlp": 3, "norm": 7, "offloaded_layers": 3}
    plain = build_policy(_config(gradient_checkpointing=False), _model_config(), torch.device("meta"))
    with pytest.raises(ValueError, match="gradient checkpointing"):
        install_long_context(plain, offload_checkpoints=True)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ({"offload_checkpoints": True, "gradient_checkpointing": False}, "offload_checkpoints"),
        ({"offload_checkpoints": True, "offload_activations": True}, "offload_checkpoints"),
        ({"tile_tokens": -2}, "tile_tokens"),  # -1 is auto
        ({"tiled_mlp": True, "lora_dropout": 0.1}, "lora_dropout"),
    ],
)
def test_config_rejects_what_cannot_work(bad, match):
    with pytest.raises(ValueError, match=match):
        _config(**bad)


def test_each_mechanism_shows_in_the_plan():
    """The plan (meta, for CPU) moves as each mechanism says, and equals the real CPU step with all on."""
    model_config = _model_config()

    def plan(**flags):
        return plan_memory(_config(tokens_per_step=2000, **flags), model_config=model_config, device="cpu")

    base = plan()
    offload = plan(offload_checkpoints=True)
    tiled = plan(tiled_mlp=True)
    assert base.host_bytes == 0 and offload.host_bytes > 0
    assert offload.breakdown.get("checkpointed activations", 0) < base.breakdown["checkpointed activations"]
    assert tiled.breakdown["recomputed layer working set"] < base.breakdown["recomputed layer working set"]
    assert plan(lean_norms=True, tiled_mlp=True).peak_bytes < base.peak_bytes


def test_plan_equals_the_real_cpu_step_with_every_mechanism():
    from fastdpo.planner.step import StepPlanner

    config = _config(tokens_per_step=1200, **dict.fromkeys(FLAGS, True))
    torch.manual_seed(0)
    real, planned = (
        StepPlanner(config, _model_config(), torch.device(device), "cpu").measure(config.tokens_per_step)
        for device in ("cpu", "meta")
    )
    assert planned.peak_bytes == pytest.approx(real.peak_bytes, rel=0.02)
    assert planned.host_bytes == pytest.approx(real.host_bytes, rel=0.02)


def test_fused_adamw_where_torch_has_it():
    config = _config()
    model = build_policy(config, _model_config(), torch.device("cpu"))
    fused = build_optimizer(config, model).defaults["fused"]
    from torch.optim.optimizer import _get_fused_kernels_supported_devices

    assert bool(fused) == ("cpu" in _get_fused_kernels_supported_devices())
    assert not build_optimizer(_config(fused_adamw=False), model).defaults["fused"]


def test_alloc_conf_default_keeps_the_users():
    env = {}
    assert default_alloc_conf(env) and env["PYTORCH_CUDA_ALLOC_CONF"] == ALLOC_CONF
    for name in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"):
        env = {name: "max_split_size_mb:128"}
        assert not default_alloc_conf(env) and env == {name: "max_split_size_mb:128"}


def test_lora_inputs_kept_uncast_under_autocast_give_the_same_bits():
    """peft casts a LoRA layer's input to fp32, autocast casts it straight back: skipping both is exact."""
    from fastdpo.train.forward import _keep_lora_inputs

    def run(keep):
        torch.manual_seed(0)
        model = build_policy(_config(param_dtype="bf16"), _model_config(), torch.device("cpu"))
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.copy_(torch.randn_like(p) * 0.1)
        if keep:
            _keep_lora_inputs(model)
            lora = [m for m in model.modules() if hasattr(m, "lora_A")]
            assert len(lora) == 21 and not any(m.cast_input_dtype_enabled for m in lora)
        ids = torch.randint(0, TINY["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(1))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids).logits.float().square().mean()
        loss.backward()
        return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]

    (want, want_grads), (got, got_grads) = run(False), run(True)
    assert torch.equal(got, want)
    assert all(torch.equal(g, w) for g, w in zip(got_grads, want_grads, strict=True))
