"""One process of a 2-GPU DDP run, started by torchrun from tests/gpu/test_te_multi_gpu.py.

te-llama's finetune step (`build_train_step`: the fused loss's LossModel wrapped in DDP by
accelerate) on a GPU-size random TE model, first with eager layers, then with CUDA graphs, on the
same packed micro-batches (each rank takes its share of every step's global batch). Rank 0 writes
what the test asserts as JSON:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/gpu/ddp_worker.py '{"out": ...}'
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: the shared random models
from conftest import random_hf_model  # noqa: E402
from hf_configs import GPU_ARCHITECTURES  # noqa: E402

import te_llama  # noqa: E402
from te_llama.train.batching import Batch, collate_packed  # noqa: E402
from te_llama.train.config import FinetuneConfig  # noqa: E402
from te_llama.train.cuda_graphs import StaticShape, installed_graphs  # noqa: E402
from te_llama.train.step import Runtime, TrainStep, build_train_step  # noqa: E402

STEPS = 4
BUDGET, MAX_DOC = 1024, 256


def packed_batches(vocab: int, count: int, seed: int = 0) -> list[Batch]:
    """Micro-batches of random documents packed into the budget and padded to it (the same on every rank)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        docs, used = [], 0
        while True:
            n = int(torch.randint(8, MAX_DOC + 1, (1,), generator=gen))
            if used + n > BUDGET - 40:
                break
            ids = torch.randint(0, vocab, (n,), generator=gen).tolist()
            docs.append({"input_ids": ids, "labels": ids})
            used += n
        batches.append(collate_packed(docs, with_cu_seqlens=True, pad_to=BUDGET, max_doc_len=MAX_DOC))
    return batches


def build(case: dict, graphs: bool, accelerator: Accelerator, shape: StaticShape) -> TrainStep:
    config = FinetuneConfig(backend="te", precision=case["precision"], fuse_qkv=case["fuse_qkv"],
                            grad_accum=case["grad_accum"], cuda_graphs=graphs, fused_loss=True,
                            batch_size=BUDGET // MAX_DOC, max_seq_len=MAX_DOC, max_steps=STEPS, learning_rate=1e-4,
                            warmup_ratio=0.0, schedule="constant", tensorboard=False)
    runtime = Runtime(accelerator.device, "te", case["precision"], torch.bfloat16)
    hf = random_hf_model(case["arch"], gpu_size=True, device=str(accelerator.device), dtype=torch.bfloat16)
    model = te_llama.convert(hf, backend="te", fuse_qkv=case["fuse_qkv"]).train()
    step = build_train_step(config, runtime, model, accelerator, STEPS, accelerator.num_processes, shape)
    step.capture_graphs()
    return step


def train(step: TrainStep, batches: list[Batch], rank: int, world: int) -> list[float]:
    """Each step's global mean loss; rank r takes micro-batches r, r + world, ... of each step's share."""
    accum, losses = step.config.grad_accum, []
    for index in range(STEPS):
        global_batch = batches[index * accum * world:(index + 1) * accum * world]
        loss, _ = step(global_batch[rank::world])
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)
        losses.append(float(loss))
    return losses


def replicas_identical(model: torch.nn.Module) -> bool:
    """Every parameter equal to rank 0's, on every rank (DDP kept the replicas in step)."""
    same = torch.ones((), device=next(model.parameters()).device)
    for param in model.parameters():
        reference = param.detach().clone()
        dist.broadcast(reference, 0)
        same *= float(torch.equal(reference, param.detach()))
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same)


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-12))


def main() -> None:
    case = json.loads(sys.argv[1])
    accelerator = Accelerator()
    rank, world = accelerator.process_index, accelerator.num_processes
    vocab = GPU_ARCHITECTURES[case["arch"]]().vocab_size
    batches = packed_batches(vocab, STEPS * case["grad_accum"] * world)
    most_docs = max(int(b.inputs["cu_seq_lens_q"].numel()) - 1 for b in batches)
    shape = StaticShape(BUDGET, most_docs + 2, MAX_DOC)
    result: dict = {"world": world, "ddp": {}}
    params = {}
    for graphs in (False, True):
        step = build(case, graphs, accelerator, shape)
        name = "graphs" if graphs else "eager"
        losses = train(step, batches, rank, world)
        installed = installed_graphs(step.raw_model)
        result["ddp"][name] = type(step.model).__name__ == "DistributedDataParallel"
        result[f"{name}_losses"] = losses
        result[f"{name}_replicas_identical"] = replicas_identical(step.raw_model)
        if graphs:
            result["graphs_captured"] = installed is not None
            result["eager_batches"] = installed.eager_batches if installed else None
            result["grads_written_in_place"] = bool(installed.grad_buffers) if installed else None
        params[name] = [p.detach().clone() for p in step.raw_model.parameters()]
        del step
    result["max_param_rel_l2"] = max(rel_l2(g, e) for g, e in zip(params["graphs"], params["eager"]))
    if rank == 0:
        Path(case["out"]).write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    main()
