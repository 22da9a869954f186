"""Loss benchmark: one step's loss computation from final hidden states (sigmoid DPO, or KTO).

Measured per provider: the policy's forward and backward plus the reference's forward (no grad), median
time and peak memory. Every provider's loss and dhidden are first checked against float64 on a reduced
copy of the batch (the first tokens of every sequence).

  naive     full logits, log_softmax, gather, sequence sums, -logsigmoid (plain PyTorch)
  trl       TRL 1.16's fused-head path: ChunkedLogProbFunction log-probs, then TRL's sigmoid loss
  liger     Liger-Kernel's LigerFusedLinearDPOLoss (use_ref_model=True)
  fastdpo   fastdpo.FusedLinearDPOLoss (reference hidden states scored inside the same call)

``--stats`` times instead what TRL's logit statistics (entropy, mean logit, label is argmax) cost
fastdpo's DPO loss: its forward with and without ``stats=True`` (the same pass over the vocabulary), and
one loss step (forward + backward) with them against the step without them plus the second, no-grad
lm_head product that FastDPOTrainer ran for them before (reconstructed in ``_old_extra_pass``). The
overhead and the time saved are medians of the per-round ratios and differences (the forwards of a round
run back to back), less noisy than a ratio of medians.

``--loss kto`` times TRL 1.16's KTO loss instead: the 2B rows are unpaired sequences, even rows desirable,
with a fixed KL term (TRL estimates it from a separate no-grad pass, outside this step). Its providers are
naive and trl (the same log-probs, then TRL's KTO formula), liger (LigerFusedLinearKTOLoss, use_ref_model)
and fastdpo (fastdpo.FusedLinearKTOLoss).

GPU:  python benchmarks/bench_loss.py --csv out/loss.csv        (B=4 pairs x 4096 tokens, Llama-3-8B head)
      python benchmarks/bench_loss.py --loss kto --csv out/loss_kto.csv   (8 sequences x 4096 tokens)
      python benchmarks/bench_loss.py --stats --csv out/loss_stats.csv
CPU:  python benchmarks/bench_loss.py [--loss kto | --stats]     (reduced mode)
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from common import format_row, median_ms, parse_providers, write_csv

PROVIDERS = ["naive", "trl", "liger", "fastdpo"]
BETA = 0.1
KTO_KL = 0.1


def _seq_logps_naive(h, w, labels):
    logits = (h @ w.T).float()
    mask = labels != -100
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * mask).sum(-1)


def _sigmoid_dpo(pol, ref):
    pc, pr = pol.chunk(2)
    rc, rr = ref.chunk(2)
    return -F.logsigmoid(BETA * ((pc - rc) - (pr - rr))).mean()


def _desirable(rows: int, device) -> torch.Tensor:
    return torch.arange(rows, device=device) % 2 == 0


def _kto(pol, ref):
    """TRL 1.16 KTOTrainer's ``kto`` loss with unit weights and the fixed KL term ``KTO_KL``."""
    r = pol - ref
    desirable = _desirable(r.shape[0], r.device)
    chosen, rejected = 1 - torch.sigmoid(BETA * (r - KTO_KL)), 1 - torch.sigmoid(BETA * (KTO_KL - r))
    return torch.where(desirable, chosen, rejected).mean()


def _seq_logps_trl(h, w, labels):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    mask = labels != -100
    tok = ChunkedLogProbFunction.apply(h[mask], w, None, labels[mask], 1.0, 32768, None, 1.0, ())[0]
    full = torch.zeros(labels.shape, device=h.device, dtype=tok.dtype).masked_scatter(mask, tok)
    return full.sum(-1)


def make_provider(name: str, loss: str = "dpo") -> Callable:
    """Returns ``f(hidden, ref_hidden, weight, labels) -> scalar loss`` (differentiable in hidden, weight)."""
    if name in ("naive", "trl"):
        seq_logps = _seq_logps_naive if name == "naive" else _seq_logps_trl
        seq_loss = _sigmoid_dpo if loss == "dpo" else _kto

        def composed(h, rh, w, labels):
            with torch.no_grad():
                ref = seq_logps(rh, w, labels)
            return seq_loss(seq_logps(h, w, labels), ref)

        return composed
    if name == "liger" and loss == "kto":
        from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss

        # torch.compile (Liger's default) needs a GPU toolchain; CPU runs eager.
        kto = LigerFusedLinearKTOLoss(beta=BETA, use_ref_model=True, compiled=torch.cuda.is_available())

        def liger_kto(h, rh, w, labels):
            kl = torch.tensor(KTO_KL, device=h.device)
            return kto(h, w, labels, None, _desirable(h.shape[0], h.device), rh, w, None, kl)[0]

        return liger_kto
    if name == "fastdpo" and loss == "kto":
        from fastdpo import FusedLinearKTOLoss

        kto = FusedLinearKTOLoss(beta=BETA)

        def fastdpo_kto(h, rh, w, labels):
            desirable = _desirable(h.shape[0], h.device)
            return kto(h, w, labels, preference_labels=desirable, ref_hidden=rh, kl=KTO_KL).loss

        return fastdpo_kto
    if name == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        loss = LigerFusedLinearDPOLoss(beta=BETA, compute_nll_loss=False, use_ref_model=True)
        return lambda h, rh, w, labels: loss(w, h, labels, None, rh, w, None)[0]
    if name == "fastdpo":
        from fastdpo import FusedLinearDPOLoss

        loss = FusedLinearDPOLoss(beta=BETA)
        return lambda h, rh, w, labels: loss(h, w, labels, ref_hidden=rh).loss
    raise ValueError(f"unknown provider {name!r}; expected one of {PROVIDERS}")


def _batch(pairs, seq, d, v, dtype, device, prompt_frac=0.25, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = (torch.randn(2 * pairs, seq, d, generator=g) * 1.5).to(device, dtype).requires_grad_()
    rh = (h.detach() + 0.05 * torch.randn(h.shape, generator=g).to(device, dtype)).contiguous()
    w = (torch.randn(v, d, generator=g) / d**0.5 * 2.0).to(device, dtype).requires_grad_()
    labels = torch.randint(0, v, (2 * pairs, seq), generator=g).to(device)
    labels[:, : int(seq * prompt_frac)] = -100
    return h, rh, w, labels


def check_provider(fn, h, rh, w, labels, tokens: int = 128, seq_loss=_sigmoid_dpo) -> tuple[float, float]:
    """|loss - ref| and max |dhidden - ref| on the first ``tokens`` of every sequence, against float64."""
    hs = h[:, :tokens].detach().clone().requires_grad_()
    ws = w.detach()
    loss = fn(hs, rh[:, :tokens].contiguous(), ws, labels[:, :tokens].contiguous())
    loss.backward()
    h64 = hs.detach().double().requires_grad_()
    w64 = ws.double()
    with torch.no_grad():
        ref_ref = _seq_logps_naive(rh[:, :tokens].double(), w64, labels[:, :tokens])
    ref = seq_loss(_seq_logps_naive(h64, w64, labels[:, :tokens]), ref_ref)
    ref.backward()
    return abs(loss.item() - ref.item()), (hs.grad.double() - h64.grad).abs().max().item()


def bench_one(name, pairs, seq, d, v, dtype, device, reps, loss="dpo") -> dict:
    h, rh, w, labels = _batch(pairs, seq, d, v, dtype, device)
    fn = make_provider(name, loss)
    row = dict(provider=name, loss=loss, pairs=pairs, seq=seq, hidden=d, vocab=v, dtype=str(dtype)[6:])
    seq_loss = _sigmoid_dpo if loss == "dpo" else _kto
    row["loss_err"], row["dh_err"] = check_provider(fn, h, rh, w, labels, seq_loss=seq_loss)

    def step():
        h.grad = None
        w.grad = None
        fn(h, rh, w, labels).backward()

    row["step_ms"] = median_ms(step, device, reps)
    if device == "cuda":
        h.grad = None
        w.grad = None
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn(h, rh, w, labels).backward()
        torch.cuda.synchronize()
        row["peak_extra_mb"] = round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)
    return row


def _old_extra_pass(h, w, labels):
    """FastDPOTrainer's former statistics: a no-grad lm_head product over the scored tokens, 2**24 logits
    at a time, then entropy, mean logit and argmax per token (its ``_logit_statistics``, reconstructed)."""
    with torch.no_grad():
        mask = labels != -100
        hidden, targets = h.detach()[mask], labels[mask]
        rows = max(1, 2**24 // w.shape[0])
        for start in range(0, hidden.shape[0], rows):
            z = (hidden[start : start + rows] @ w.T).float()
            _ = torch.logsumexp(z, -1) - (torch.softmax(z, -1) * z).sum(-1)
            _ = z.mean(-1), z.argmax(-1) == targets[start : start + rows]


def _interleaved_ms(fns: dict[str, Callable], device: str, reps: int) -> dict[str, list[float]]:
    """ms of each of ``fns`` per round, run in turn ``reps`` rounds (after one warm-up), so that load changes
    hit all alike. On the CPU it is the process's CPU time, which other processes on a shared machine
    inflate far less than wall time."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(reps + 1):
        for name, fn in fns.items():
            if device == "cuda":
                elapsed = median_ms(fn, device, 1)
            else:
                start = time.process_time()
                fn()
                elapsed = (time.process_time() - start) * 1e3
            if i:
                times[name].append(elapsed)
    return times


def bench_stats(pairs, seq, d, v, dtype, device, reps) -> dict:
    """Forward and step times of fastdpo's DPO loss with and without its statistics; see the docstring."""
    from fastdpo import FusedLinearDPOLoss

    h, rh, w, labels = _batch(pairs, seq, d, v, dtype, device)
    plain, with_stats = FusedLinearDPOLoss(beta=BETA), FusedLinearDPOLoss(beta=BETA, stats=True)

    def forward(loss):
        with torch.no_grad():
            loss(h, w, labels, ref_hidden=rh)

    def step(loss, extra=False):
        h.grad = None
        w.grad = None
        loss(h, w, labels, ref_hidden=rh).loss.backward()
        if extra:
            _old_extra_pass(h, w, labels)

    ms = _interleaved_ms(
        {
            "fwd_ms": lambda: forward(plain),
            "fwd_stats_ms": lambda: forward(with_stats),
            "step_ms": lambda: step(plain),
            "step_stats_ms": lambda: step(with_stats),
            "step_old_extra_pass_ms": lambda: step(plain, extra=True),
        },
        device,
        reps,
    )
    row = dict(provider="fastdpo", pairs=pairs, seq=seq, hidden=d, vocab=v, dtype=str(dtype)[6:])
    row.update({k: round(statistics.median(x), 2) for k, x in ms.items()})
    # Ratios within a round: the two forwards ran back to back, so a slow round slows both alike.
    ratios = [b / a for a, b in zip(ms["fwd_ms"], ms["fwd_stats_ms"], strict=True)]
    row["stats_fwd_overhead_pct"] = round(100 * (statistics.median(ratios) - 1), 1)
    saved = [a - b for a, b in zip(ms["step_old_extra_pass_ms"], ms["step_stats_ms"], strict=True)]
    row["step_saved_ms"] = round(statistics.median(saved), 2)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=None, help="B (default 4 on GPU, 2 on CPU)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default 4096 on GPU)")
    p.add_argument("--hidden", type=int, default=None, help="D (default 4096 on GPU)")
    p.add_argument("--vocab", type=int, default=None, help="V (default 128256 on GPU)")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--loss", default="dpo", choices=["dpo", "kto"], help="sigmoid DPO, or KTO on 2B rows")
    p.add_argument("--stats", action="store_true", help="time the logit statistics instead (see above)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--csv", help="write the rows as CSV here")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = device == "cuda"
    pairs = args.pairs or (4 if gpu else 2)
    seq = args.seq or (4096 if gpu else 256)
    d = args.hidden or (4096 if gpu else 128)
    v = args.vocab or (128256 if gpu else 4096)
    dtype = getattr(torch, args.dtype)
    if not gpu:
        print("CPU reduced mode: small shapes, fp32, torch backend; GPU numbers need a GPU.")
        dtype = torch.float32
        args.reps = min(args.reps, 3) if not args.stats else args.reps
    if args.stats:
        rows = [bench_stats(pairs, seq, d, v, dtype, device, args.reps)]
        print(format_row(rows[0]), flush=True)
        write_csv(args.csv, rows)
        return rows
    wanted = parse_providers(p, args.providers, PROVIDERS)
    rows = []
    for name in wanted:
        try:
            row = bench_one(name, pairs, seq, d, v, dtype, device, args.reps, args.loss)
        except ImportError as exc:
            print(f"skipped {name}: {exc}")
            continue
        except torch.OutOfMemoryError:
            row = dict(provider=name, pairs=pairs, seq=seq, hidden=d, vocab=v, error="OOM")
            torch.cuda.empty_cache()
        rows.append(row)
        print(format_row(row), flush=True)
    naive = next((r["step_ms"] for r in rows if r["provider"] == "naive" and "step_ms" in r), None)
    for r in rows:
        if naive and "step_ms" in r:
            r["speedup_vs_naive"] = round(naive / r["step_ms"], 3)
            print(f"{r['provider']}: {r['speedup_vs_naive']}x naive")
    write_csv(args.csv, rows)
    return rows


if __name__ == "__main__":
    main()
