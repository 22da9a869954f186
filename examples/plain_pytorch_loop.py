"""A hand-written DPO loop on a Hugging Face causal LM, and the one-line swap to fastdpo's fused loss.

The naive loss builds the ``[2B, T, V]`` logits, log-softmaxes them and gathers the labels; fastdpo's
``FusedLinearDPOLoss`` takes the same final hidden states and lm_head weight and never materializes the
logits. Everything else in the loop stays as it is.

Runs on CPU in seconds with a tiny random Llama (tied embeddings)::

    python examples/plain_pytorch_loop.py            # fused loss
    python examples/plain_pytorch_loop.py --naive    # the textbook loss, for comparison

With a real model, replace ``build_model`` with ``AutoModelForCausalLM.from_pretrained(...)`` and the random
pairs with tokenized ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` (responses end with EOS).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from fastdpo.losses import FusedLinearDPOLoss, sequence_logps
from fastdpo.modeling import lm_head_params
from fastdpo.packing import IGNORE_INDEX

VOCAB = 128
PAD = 0


def build_model(seed: int) -> LlamaForCausalLM:
    """A tiny random Llama whose lm_head shares its weight with the input embedding."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


def random_pairs(num_pairs: int, generator: torch.Generator) -> list[dict[str, list[int]]]:
    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=generator).tolist()

    return [
        {
            "prompt_ids": ids(int(torch.randint(3, 9, (), generator=generator))),
            "chosen_ids": ids(int(torch.randint(2, 10, (), generator=generator))),
            "rejected_ids": ids(int(torch.randint(2, 10, (), generator=generator))),
        }
        for _ in range(num_pairs)
    ]


def collate(pairs: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Padded layout: rows ``0..B-1`` are prompt+chosen, rows ``B..2B-1`` prompt+rejected.

    ``labels[r, t]`` is the token predicted at position ``t`` (already shifted), ``IGNORE_INDEX`` on the
    prompt and the padding, so only response tokens are scored.
    """
    rows = [(p["prompt_ids"], p[key]) for key in ("chosen_ids", "rejected_ids") for p in pairs]
    width = max(len(prompt) + len(response) for prompt, response in rows)
    input_ids = torch.full((len(rows), width), PAD)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX)
    for r, (prompt, response) in enumerate(rows):
        seq = prompt + response
        input_ids[r, : len(seq)] = torch.tensor(seq)
        attention_mask[r, : len(seq)] = 1
        labels[r, len(prompt) - 1 : len(seq) - 1] = torch.tensor(response)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def final_hidden_states(model: LlamaForCausalLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    # model.model is the decoder without lm_head; its last_hidden_state is what lm_head would multiply.
    return model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state


def naive_dpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float,
) -> torch.Tensor:
    """Sigmoid DPO loss the textbook way, materializing ``[2B, T, V]`` logits."""
    logits = hidden @ weight.T if bias is None else hidden @ weight.T + bias
    logp = logits.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    seq_logps = (logp * (labels != IGNORE_INDEX)).sum(-1)
    chosen, rejected = seq_logps.chunk(2)
    margin = (chosen - ref_chosen_logps) - (rejected - ref_rejected_logps)
    return -F.logsigmoid(beta * margin).mean()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--naive", action="store_true", help="use the naive loss instead of the fused one")
    opts = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_model(seed=0).to(device)
    pairs = random_pairs(opts.pairs, torch.Generator().manual_seed(0))
    batches = [
        {k: v.to(device) for k, v in collate(pairs[i : i + opts.batch_size]).items()}
        for i in range(0, len(pairs), opts.batch_size)
    ]

    # The reference is the initial policy, so its log-probs are computed once, up front, without grad.
    model.eval()
    weight, bias = lm_head_params(model)
    with torch.no_grad():
        refs = [sequence_logps(final_hidden_states(model, b), weight, b["labels"], bias) for b in batches]

    fused_loss = FusedLinearDPOLoss(beta=opts.beta)

    def dpo_loss(
        batch: dict[str, torch.Tensor], ref: tuple[torch.Tensor, torch.Tensor], naive: bool
    ) -> torch.Tensor:
        hidden = final_hidden_states(model, batch)
        weight, bias = lm_head_params(model)  # with tied embeddings, the embedding's own Parameter
        labels, (ref_c, ref_r) = batch["labels"], ref
        if naive:
            return naive_dpo_loss(hidden, weight, labels, bias, ref_c, ref_r, beta=opts.beta)
        # The one-line swap: the same inputs, and no [2B, T, V] logits.
        return fused_loss(hidden, weight, labels, bias, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r).loss

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr)
    for step in range(1, opts.steps + 1):
        i = (step - 1) % len(batches)
        loss = dpo_loss(batches[i], refs[i], naive=opts.naive)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.5f}")

    # At step 1 the policy is the reference and both losses are log(2); after training they still agree.
    with torch.no_grad():
        naive, fused = (dpo_loss(batches[0], refs[0], naive=flag).item() for flag in (True, False))
    print(f"trained policy, first batch: naive loss {naive:.6f}, fused loss {fused:.6f}")


if __name__ == "__main__":
    main()
