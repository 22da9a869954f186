"""The packed DPO trainer behind ``fastdpo train`` and ``fastdpo demo``: ``Trainer(config).train()``.

Rooms, in the order a run meets them:

- ``config``: ``TrainConfig``, every option, coerced and validated.
- ``build``: the job (torchrun or one process), device, models, LoRA, optimizer and LR schedule.
- ``plan``: tokenized splits, bins of ``tokens_per_step`` tokens, and each epoch's optimizer steps.
- ``forward``: the packed forward pass (pack, decoder, fused loss) and metric reduction over ranks.
- ``reference``: the reference modes and the precomputed reference log-probs' disk cache.
- ``kto``: unpaired data (``loss_type`` kto / apo_zero_unpaired): splits with fixed bins, the KL
  sequences packed beside the completions, ``FusedLinearKTOLoss`` and TRL's KTO metrics.
- ``checkpoints``: save, resume and the final export (local checkpoints, or sharded ones under fsdp2).
- ``metrics``: ``metrics.jsonl`` and TensorBoard.
- ``health``: applied and skipped steps, bad streaks (non-finite or zero gradient norms), an honest end.
- ``runlock``: the exclusive lock on ``output_dir`` that ``train`` and ``Trainer.train`` hold for the life
  of a run.
- ``loop``: ``Trainer``, the loop from step planning to the optimizer step, and ``train``.

Limited VRAM: ``gradient_checkpointing`` keeps only each decoder layer's input and recomputes the rest
in the backward. ``offload_activations`` wraps the decoder forward in
``torch.autograd.graph.save_on_cpu``: every tensor autograd saves there, which under (non-reentrant)
checkpointing is essentially each layer's ``[N, D]`` input, is copied to CPU memory (pinned on CUDA)
and copied back during the backward. It trades host-device traffic for memory; use it with
``gradient_checkpointing``, since without it every intermediate activation would travel.

Data parallelism (``strategy`` ddp / fsdp2, launched by torchrun) uses ``fastdpo.distributed``: every
rank plans the same steps, ``shard_bins`` gives each rank a balanced share of each step's bins (padded
with loss-times-zero micro-batches so that all ranks run as many), gradients synchronize on the last
micro-batch only, and each micro-batch's loss is scaled by ``pairs * world_size / step_pairs`` because
DDP and FSDP2 average gradients over ranks: the update is that of the mean over all pairs of the step.
Metrics are combined with ``gather_metrics``; only rank 0 logs and writes files. Checkpoints are
``fastdpo.checkpoint``'s (rank 0) under none / ddp and sharded ones (``save_sharded``) under fsdp2,
whose final export is consolidated into one ``from_pretrained`` folder.

Single node: ``torchrun --nproc_per_node=8 -m fastdpo train --strategy fsdp2 --config run.yaml``.
Multi node: the same on every node with ``--nnodes=2 --node_rank=<i> --master_addr=<node 0>
--master_port=29500`` (``output_dir`` on a filesystem every node sees).
"""

from fastdpo.train.config import TrainConfig
from fastdpo.train.forward import METRIC_NAMES
from fastdpo.train.loop import Trainer, train

__all__ = ["METRIC_NAMES", "TrainConfig", "Trainer", "train"]
