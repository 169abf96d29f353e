"""Regenerate the small bundled datasets in src/te_llama/assets (deterministic).

Simple, learnable facts (arithmetic, ordering, colours) so a tiny model's loss visibly falls.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ASSETS = Path(__file__).resolve().parents[1] / "src" / "te_llama" / "assets"
COLOURS = {"sky": "blue", "grass": "green", "snow": "white", "coal": "black", "blood": "red",
           "sun": "yellow", "sea": "blue", "night": "dark", "milk": "white", "leaf": "green"}
NUMBERS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


def text_rows(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(240):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"text": f"The sum of {a} and {b} is {a + b}. The product of {a} and {b} is {a * b}."})
    for thing, colour in COLOURS.items():
        for _ in range(4):
            rows.append({"text": f"The colour of the {thing} is {colour}. Everyone knows the {thing} is {colour}."})
    for _ in range(80):
        n = rng.randint(0, 9)
        rows.append({"text": f"After {NUMBERS[n]} comes {NUMBERS[n + 1]}, and before {NUMBERS[n + 1]} is {NUMBERS[n]}."})
    rng.shuffle(rows)
    return rows


def chat_rows(rng: random.Random) -> list[dict]:
    rows = []
    for _ in range(120):
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        rows.append({"messages": [
            {"role": "system", "content": "You are a careful calculator."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            {"role": "user", "content": f"And {a} times {b}?"},
            {"role": "assistant", "content": f"{a} times {b} is {a * b}."},
        ]})
    return rows


def main() -> None:
    rng = random.Random(1234)
    ASSETS.mkdir(parents=True, exist_ok=True)
    for name, rows in (("sample_text.jsonl", text_rows(rng)), ("sample_chat.jsonl", chat_rows(rng))):
        with open(ASSETS / name, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
