"""`te-llama check` on the CPU: one tiny model per family, converted, compared with HF, exported."""

from __future__ import annotations

from te_llama.check import DEFAULT_PRESETS
from te_llama.cli import main


def test_check_passes_for_every_family(capsys) -> None:
    assert main(["check"]) == 0
    out = capsys.readouterr().out
    assert out.strip().endswith("check passed")
    rows = [line.split() for line in out.splitlines() if line.startswith("tiny-")]
    assert {row[1] for row in rows} == {"llama", "qwen2", "qwen3", "phi3", "gemma"}
    assert len(rows) == 2 * len(DEFAULT_PRESETS) and all(row[-1] == "bit-identical" for row in rows)


def test_check_a_chosen_preset(capsys) -> None:
    assert main(["check", "--preset", "tiny-phi3"]) == 0
    assert [line.split()[:4] for line in capsys.readouterr().out.splitlines() if line.startswith("tiny-")] == \
        [["tiny-phi3", "phi3", "reference", "separate"], ["tiny-phi3", "phi3", "reference", "fused"]]
