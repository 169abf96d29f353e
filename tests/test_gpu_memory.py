"""The --max-memory cap (checked here without a GPU: torch's calls faked)."""

from __future__ import annotations

import os

import pytest
import torch

from te_llama.train import gpu_memory
from te_llama.train.config import ConfigError


def test_max_memory_without_a_gpu_is_refused() -> None:
    with pytest.raises(ConfigError, match="--max-memory 75 caps GPU memory, and this run has no GPU: leave it out"):
        gpu_memory.limit_memory(torch.device("cpu"), 75)
    assert gpu_memory.limit_memory(torch.device("cpu"), None) is None


class _Props:
    total_memory = 80 * 2**30


def test_max_memory_sets_the_per_process_fraction(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: _Props())
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda f, d: calls.append((f, d)))
    cuda = torch.device("cuda", 0)
    assert gpu_memory.limit_memory(cuda, 60) == 60 * 2**30
    assert calls == [(0.75, cuda)]
    with pytest.raises(ConfigError, match="--max-memory 81 GiB is more than this GPU has \\(80.0 GiB\\)"):
        gpu_memory.limit_memory(cuda, 81)


def test_available_memory_counts_no_cached_block_and_stays_within_the_cap(monkeypatch) -> None:
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (50 * 2**30, 80 * 2**30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 30 * 2**30)  # a graph pool's slack in it
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: 20 * 2**30)
    cuda = torch.device("cuda", 0)
    assert gpu_memory.available_bytes(cuda, None) == 50 * 2**30  # free after empty_cache, not + reserved slack
    assert emptied == [True]
    assert gpu_memory.available_bytes(cuda, 40 * 2**30) == 10 * 2**30  # cap - reserved
    assert gpu_memory.available_bytes(cuda, 100 * 2**30) == 50 * 2**30  # the GPU's free memory below a loose cap


def test_expandable_segments_unless_the_user_set_the_allocator_or_runs_the_hf_baseline(monkeypatch) -> None:
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "restored after the test")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    gpu_memory.prefer_expandable_segments("hf")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
    gpu_memory.prefer_expandable_segments("te")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:512")
    gpu_memory.prefer_expandable_segments("auto")
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:512"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)  # too late: CUDA already started
    gpu_memory.prefer_expandable_segments("te")
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ
