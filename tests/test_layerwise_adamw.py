"""LayerwiseAdamW against torch's AdamW on the same model and data (CPU: HF layers and our reference layers)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_hf_model

from te_llama.model.convert import convert, decoder_layers
from te_llama.train.layerwise_adamw import LayerwiseAdamW

ADAMW = {"lr": 1e-3, "weight_decay": 0.1, "betas": (0.9, 0.95)}
SINGLE_TENSOR = {"foreach": False, "fused": False}  # LayerwiseAdamW's own kernel: bit-equal by construction
STEPS = 3


def batches(vocab: int, count: int = STEPS) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, vocab, (2, 24), generator=gen) for _ in range(count)]


def model_for(backend: str, arch: str = "llama3.1-gqa-llama3-rope") -> torch.nn.Module:
    hf = random_hf_model(arch)
    model = hf if backend == "hf" else convert(hf, backend="reference", fuse_qkv=True)
    return model.train()


def train(model, optimizer, data: list[torch.Tensor]) -> list[float]:
    losses = []
    for ids in data:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def layerwise(model) -> LayerwiseAdamW:
    return LayerwiseAdamW(model, list(decoder_layers(model)), **ADAMW)


@pytest.mark.parametrize("backend", ["hf", "reference"])
@pytest.mark.parametrize("arch", ["llama3.1-gqa-llama3-rope", "qwen2-qkv-bias-tied"])
def test_same_training_as_adamw(backend: str, arch: str) -> None:
    plain = model_for(backend, arch)
    ours = copy.deepcopy(plain)
    data = batches(plain.config.vocab_size)
    want = train(plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], **ADAMW, **SINGLE_TENSOR), data)
    got = train(ours, layerwise(ours), data)
    assert got == want
    for (name, p), q in zip(plain.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


def test_layers_are_updated_during_backward() -> None:
    model = model_for("reference")
    optimizer = layerwise(model)
    layer_weight = next(decoder_layers(model)[0].parameters())
    head_weight = model.lm_head.weight
    before_layer, before_head = layer_weight.detach().clone(), head_weight.detach().clone()
    ids = batches(model.config.vocab_size, 1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    assert not torch.equal(layer_weight, before_layer), "the first layer was not updated during backward"
    assert torch.equal(head_weight, before_head), "the lm_head must wait for step()"
    optimizer.step()
    assert not torch.equal(head_weight, before_head)


def test_second_backward_before_step_is_refused() -> None:
    model = model_for("hf")
    optimizer = layerwise(model)
    ids = batches(model.config.vocab_size, 1)[0]
    model(input_ids=ids, labels=ids).loss.backward()
    with pytest.raises(RuntimeError, match="one backward per optimizer step"):
        model(input_ids=ids, labels=ids).loss.backward()
    optimizer.zero_grad()


def test_no_grad_forward_and_frozen_layer() -> None:
    model = model_for("hf")
    for p in decoder_layers(model)[1].parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in decoder_layers(model)[1].parameters()]
    plain = copy.deepcopy(model)
    ids = batches(model.config.vocab_size, 1)[0]
    optimizer = layerwise(model)
    with torch.no_grad():
        model(input_ids=ids)  # registers nothing: no backward will come
    got = train(model, optimizer, [ids, ids])
    want = train(plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], **ADAMW, **SINGLE_TENSOR), [ids, ids])
    assert got == want
    assert all(torch.equal(p, q) for p, q in zip(decoder_layers(model)[1].parameters(), frozen))


def test_resume_from_state_dict_continues_exactly() -> None:
    model = model_for("reference")
    data = batches(model.config.vocab_size, 4)
    straight = copy.deepcopy(model)
    want = train(straight, layerwise(straight), data)

    optimizer = layerwise(model)
    first = train(model, optimizer, data[:2])
    saved_model, saved_optimizer = copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())
    resumed = model_for("reference")
    resumed.load_state_dict(saved_model)
    optimizer = layerwise(resumed)
    optimizer.load_state_dict(saved_optimizer)
    assert first + train(resumed, optimizer, data[2:]) == want


@pytest.mark.parametrize("backend", ["hf", "reference"])
def test_same_training_as_adamw_with_activation_checkpointing(backend: str) -> None:
    """Recomputed layers run their forward again inside backward: still one update per layer and step."""
    plain = model_for(backend)
    plain.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ours = copy.deepcopy(plain)
    data = batches(plain.config.vocab_size)
    want = train(plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], **ADAMW, **SINGLE_TENSOR), data)
    updates = []
    optimizer = layerwise(ours)
    real_update = optimizer._update
    optimizer._update = lambda groups: (updates.append(len(groups)), real_update(groups))
    assert train(ours, optimizer, data) == want
    layers = len(decoder_layers(ours))
    assert updates[:layers] == [1] * layers, "each layer once, from its backward hook"
    for (name, p), q in zip(plain.named_parameters(), ours.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0, msg=name)


class _RecomputeWithHooks(torch.nn.Module):
    """A layer checkpointed around its whole `__call__`, so its module hooks run again in the recompute (what
    transformers versions that checkpoint `__call__` instead of `forward` do)."""

    def __init__(self, layer: torch.nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args, **kwargs):
        return torch.utils.checkpoint.checkpoint(self.layer, *args, use_reentrant=False, **kwargs)


def test_a_recompute_that_runs_the_layer_hooks_again_adds_no_second_update() -> None:
    plain = model_for("reference")
    ours = copy.deepcopy(plain)
    layers = list(decoder_layers(ours))
    optimizer = layerwise(ours)  # its hooks sit on the layers themselves
    calls = []
    for layer in layers:
        layer.register_forward_pre_hook(lambda module, args, kwargs: calls.append(1), with_kwargs=True)
    ours.model.layers = torch.nn.ModuleList(_RecomputeWithHooks(layer) for layer in layers)
    data = batches(plain.config.vocab_size)
    want = train(plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], **ADAMW, **SINGLE_TENSOR), data)
    assert train(ours, optimizer, data) == want
    assert len(calls) == 2 * len(layers) * len(data), "the hooks ran in the forward and again in the recompute"


def test_reused_grad_buffers_need_every_layer_trainable() -> None:
    model = model_for("hf")
    for p in decoder_layers(model)[0].parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="every decoder layer trainable"):
        LayerwiseAdamW(model, list(decoder_layers(model)), reused_grad_buffers=2, **ADAMW)


def test_triton_kernel_is_refused_without_a_gpu_and_checks_its_name() -> None:
    model = model_for("hf")
    with pytest.raises(ValueError, match="CUDA GPU and Triton"):
        LayerwiseAdamW(model, list(decoder_layers(model)), kernel="triton", **ADAMW)
    with pytest.raises(ValueError, match="unknown"):
        LayerwiseAdamW(model, list(decoder_layers(model)), kernel="apex", **ADAMW)


def test_step_updates_a_layer_whose_backward_hook_did_not_fire() -> None:
    """Layer 0's input needs no gradient, so its backward hook never fires: step() updates it."""
    model = model_for("reference")
    layers = list(decoder_layers(model))
    optimizer = layerwise(model)
    weights = [next(layer.parameters()) for layer in layers]
    before = [w.detach().clone() for w in weights]
    ids = batches(model.config.vocab_size, 1)[0]
    with torch.no_grad():
        hidden = model.model.embed_tokens(ids)
    model(inputs_embeds=hidden, labels=ids).loss.backward()
    assert torch.equal(weights[0], before[0]), "layer 0 has no backward hook to update it"
    assert all(not torch.equal(w, b) for w, b in zip(weights[1:], before[1:]))
    optimizer.step()
    assert not torch.equal(weights[0], before[0]), "step() must update the layers backward did not"


@pytest.mark.parametrize("saved_overlap", [True, False])
def test_optimizer_state_loads_whichever_way_the_resumed_run_updates(saved_overlap: bool) -> None:
    """A resumed run may update during backward (one process, --grad-accum 1) where the saved one updated
    after it (--grad-accum 2, several processes), or the reverse: both optimizers have one group per layer."""
    from te_llama.train.config import resolve_config
    from te_llama.train.step import Features, Runtime, make_optimizer

    def optimizer(model, overlap: bool) -> torch.optim.Optimizer:
        features = Features(cuda_graphs=False, overlap_optimizer=overlap, fused_loss=False, optimizer_kernel="torch")
        runtime = Runtime(torch.device("cpu"), "reference", "fp32", torch.float32)
        return make_optimizer(resolve_config(), runtime, model, features)

    model = model_for("reference")
    saved = optimizer(model, saved_overlap)
    train(model, saved, batches(model.config.vocab_size, 1))
    resumed = optimizer(model, not saved_overlap)
    assert isinstance(resumed, LayerwiseAdamW) == (not saved_overlap)
    resumed.load_state_dict(saved.state_dict())
    assert len(resumed.param_groups) == len(decoder_layers(model)) + 1
    assert all(int(resumed.state[p]["step"]) == 1 for p in model.parameters())


def test_a_checkpoint_with_one_optimizer_group_resumes_into_the_layer_groups(tmp_path) -> None:
    """Earlier te-llama saved AdamW with one group (--grad-accum > 1, several processes). Resumed through
    `load_checkpoint` into today's per-layer groups, each parameter gets its own moments and every group
    follows the saved schedule: the same training, bit for bit, as the one-group run continued."""
    from transformers import get_scheduler

    from te_llama.errors import CheckpointError
    from te_llama.train.checkpoints import Position, in_group_layout, load_checkpoint, save_checkpoint
    from te_llama.train.config import resolve_config
    from te_llama.train.step import Features, Runtime, make_optimizer

    def schedule(optimizer):
        return get_scheduler("linear", optimizer, num_warmup_steps=2, num_training_steps=6)

    def steps(model, optimizer, scheduler, data) -> list[float]:
        losses = []
        for ids in data:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        return losses

    model = model_for("reference")
    data = batches(model.config.vocab_size, 4)
    old = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], **ADAMW, **SINGLE_TENSOR)
    old_schedule = schedule(old)
    steps(model, old, old_schedule, data[:2])
    path = save_checkpoint(tmp_path, Position(step=2), model, old, old_schedule, keep_last=1)
    continued, continued_opt, continued_schedule = copy.deepcopy((model, old, old_schedule))
    want = steps(continued, continued_opt, continued_schedule, data[2:])

    resumed = model_for("reference")
    features = Features(cuda_graphs=False, overlap_optimizer=False, fused_loss=False, optimizer_kernel="torch")
    runtime = Runtime(torch.device("cpu"), "reference", "fp32", torch.float32)
    optimizer = make_optimizer(resolve_config(), runtime, resumed, features)
    scheduler = schedule(optimizer)
    load_checkpoint(path, resumed, optimizer, scheduler)
    assert len(optimizer.param_groups) == len(decoder_layers(resumed)) + 1
    assert steps(resumed, optimizer, scheduler, data[2:]) == want
    assert {group["lr"] for group in optimizer.param_groups} == {continued_opt.param_groups[0]["lr"]}
    for (name, got), expected in zip(resumed.named_parameters(), continued.parameters()):
        assert torch.equal(got, expected), name
    saved = old.state_dict()
    with pytest.raises(CheckpointError, match="2 parameter groups"):
        in_group_layout(saved | {"param_groups": saved["param_groups"] * 2}, optimizer, resumed, path)
