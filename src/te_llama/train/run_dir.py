"""The run folder (`--output-dir`): what te-llama writes there, and what it may delete.

te-llama deletes only what it wrote itself. A folder is a te-llama run when it holds
`run_config.json`; its own entries are the names in `OWN_ENTRIES` (and checkpoints named like
te-llama's). Anything else in the folder makes te-llama refuse to clear it, even with
`--overwrite`, and the folder itself is never removed: only its te-llama entries are.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import shutil
import sys
from dataclasses import asdict, fields, replace
from pathlib import Path

from ..errors import TeLlamaError
from ..precision import DEFAULT_FP8
from .checkpoints import MERGED_EXPORT_NAME, checkpoints, read_meta
from .config import EVAL_SPLIT_SEED, RESUME_FREE_FIELDS, SAVED_EXTRAS, FinetuneConfig, save_config

logger = logging.getLogger(__name__)
RUN_CONFIG = "run_config.json"
CHECKPOINTS = "checkpoints"
FINAL = "final"
MERGED = MERGED_EXPORT_NAME
OWN_ENTRIES = (RUN_CONFIG, "data_report.json", "metrics.jsonl", "metrics.png", "tensorboard", CHECKPOINTS,
               FINAL, f".{FINAL}.tmp-*", f".{FINAL}.old-*", MERGED, f".{MERGED}.tmp-*", f".{MERGED}.old-*")
"""Top-level names (glob patterns) te-llama writes in a run folder."""
OWN_CHECKPOINT_ENTRIES = ("step-*", ".step-*")
"""Names te-llama writes inside `checkpoints/`."""


class RunDirectoryError(TeLlamaError, ValueError):
    """The output folder conflicts with what was asked (another run there, nothing to resume, other files)."""


def _own(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def foreign_entries(out: Path) -> list[str]:
    """Entries of `out` that te-llama did not write (relative names), sorted."""
    if not (out / RUN_CONFIG).is_file():
        return sorted(p.name for p in out.iterdir())
    found = [p.name for p in out.iterdir() if not _own(p.name, OWN_ENTRIES)]
    ckpt = out / CHECKPOINTS
    if ckpt.is_dir():
        found += [f"{CHECKPOINTS}/{p.name}" for p in ckpt.iterdir() if not _own(p.name, OWN_CHECKPOINT_ENTRIES)]
    return sorted(found)


def _protected_reason(out: Path) -> str | None:
    """Why te-llama must never clear `out`, or None: the root, the home folder, a parent of the cwd."""
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == Path(resolved.anchor):
        return "it is the root folder"
    if resolved == Path.home().resolve():
        return "it is your home folder"
    if resolved != cwd and resolved in cwd.parents:
        return "it holds the current folder"
    return None


def has_progress(out: Path) -> bool:
    """A run with something to lose: a complete checkpoint or a final export (also one a kill left
    renamed aside mid-replacement, which the next start puts back)."""
    return bool(checkpoints(out / CHECKPOINTS)) or (out / FINAL).is_dir() or any(out.glob(f".{FINAL}.old-*"))


def check_output_dir(config: FinetuneConfig, world: int = 1) -> None:
    """Every refusal about the output folder, before any work and without writing anything.

    A run that stopped before its first checkpoint (a crash, a kill, bad data found late) has
    nothing to lose: a new start reuses its folder. A resumed run may use another number of
    processes if grad_accum x processes (the global batch) stays the same.
    """
    out = Path(config.output_dir)
    if out.exists() and not out.is_dir():
        raise RunDirectoryError(f"--output-dir {out} is a file; choose a folder")
    if config.resume:
        _check_resume(config, out, world)
        return
    if not out.is_dir() or not any(out.iterdir()):
        return
    foreign = foreign_entries(out)
    if foreign:
        shown = ", ".join(foreign[:10]) + (f" and {len(foreign) - 10} more" if len(foreign) > 10 else "")
        raise RunDirectoryError(f"--output-dir {out} holds files te-llama did not write ({shown}); te-llama never "
                                "deletes them: choose a new or empty --output-dir")
    if has_progress(out) and not config.overwrite:
        raise RunDirectoryError(f"--output-dir {out} already holds a previous te-llama run with checkpoints or an "
                                "export; pass --resume to continue it, --overwrite to replace it, or choose another "
                                "--output-dir")
    reason = _protected_reason(out)
    if reason:
        raise RunDirectoryError(f"--output-dir {out}: te-llama does not clear this folder ({reason}); choose a "
                                "dedicated --output-dir")
    for option, value in (("--model", config.model), ("--data", config.data)):
        inside = _inside_own_entry(out, value)
        if inside:
            raise RunDirectoryError(f"{option} {value} is inside {inside}, which starting a new run in --output-dir "
                                    f"{out} would delete; copy it elsewhere first, or choose another --output-dir")


def _inside_own_entry(out: Path, value: str | None) -> Path | None:
    """The te-llama entry of `out` that holds the path `value`, if any (it would be deleted with it)."""
    if not value or not (out / RUN_CONFIG).is_file():
        return None
    path = Path(value).expanduser().resolve()
    for entry in out.iterdir():
        if _own(entry.name, OWN_ENTRIES) and (path == entry.resolve() or entry.resolve() in path.parents):
            return entry
    return None


def _check_resume(config: FinetuneConfig, out: Path, world: int) -> None:
    saved = out / RUN_CONFIG
    if not saved.is_file():
        raise RunDirectoryError(f"--resume: {out} holds no te-llama run to resume ({RUN_CONFIG} missing)")
    found = checkpoints(out / CHECKPOINTS)
    if not found:
        raise RunDirectoryError(f"--resume: the run in {out} stopped before its first checkpoint, so there is "
                                "nothing to resume; start it again without --resume (its folder is reused)")
    read_meta(found[-1])  # a checkpoint this te-llama cannot read is the first thing to say
    # A setting added after the run started is absent from its file: it ran with the default.
    previous = {f.name: f.default for f in fields(FinetuneConfig)} | json.loads(saved.read_text())
    global_batch = previous.get("grad_accum", 1) * previous.get("world_size", 1)
    changed = sorted(k for k, v in asdict(config).items()  # RESOLVED_FIELDS: by check_resume_resolved
                     if k not in RESUME_FREE_FIELDS and k not in RESOLVED_FIELDS and previous.get(k) != v
                     and not (k == "grad_accum" and v * world == global_batch))
    if changed:
        diffs = ", ".join(f"{k}: {previous.get(k)!r} -> {getattr(config, k)!r}" for k in changed)
        raise RunDirectoryError(f"--resume: the run in {out} was started with other settings ({diffs}); "
                                "resume with the same settings, or start a new --output-dir")


def check_resume_fingerprint(out: Path, fingerprint: dict[str, str]) -> None:
    """Refuse to resume on other data or another tokenizer than the run started with."""
    previous = json.loads((out / RUN_CONFIG).read_text()).get("fingerprint")
    if previous is None:
        logger.warning("%s records no data fingerprint: cannot check the data is unchanged", out / RUN_CONFIG)
        return
    changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
    if changed:
        raise RunDirectoryError(f"--resume: the {' and the '.join(changed)} changed since the run in {out} started "
                                f"(fingerprint {', '.join(f'{k} {previous.get(k)} -> {fingerprint[k]}' for k in changed)}); "
                                "resuming would continue on other inputs. Restore them, or start a new --output-dir")


RESOLVED_FIELDS = ("backend", "precision", "param_dtype")
"""Options compared on resume by what they resolved to, not by what was written ("auto")."""
LEGACY_AUTO_PRECISION = {True: "bf16", False: "fp32"}
"""What precision "auto" meant (on CUDA / not) for runs that predate the "resolved" record."""


def check_resume_resolved(out: Path, resolved: dict[str, str], cuda: bool) -> None:
    """Refuse to resume in another backend, precision or weight dtype than the run trained in: an
    "auto" setting resolves by machine and te-llama version, so it is compared resolved. Settings
    this te-llama no longer has are refused when the run used them."""
    saved = json.loads((out / RUN_CONFIG).read_text())
    gone = {k: v for k, v in saved.items() if k not in {f.name for f in fields(FinetuneConfig)}
            and k not in SAVED_EXTRAS and v not in (0, None, False)}
    if gone:
        raise RunDirectoryError(f"--resume: the run in {out} used settings this te-llama no longer has ({gone}); "
                                "finish it with the te-llama version that started it, or start a new run")
    previous = saved.get("resolved")
    if previous is None:  # a run from before the record: of the "auto"s only precision's changed meaning
        previous = {}
        for key in RESOLVED_FIELDS:
            value = saved.get(key, "auto")
            if value == "auto":
                value = LEGACY_AUTO_PRECISION[cuda] if key == "precision" else resolved[key]
            previous[key] = DEFAULT_FP8 if value == "fp8" else value
    changed = [k for k in resolved if k in previous and previous[k] != resolved[k]]
    if changed:
        diffs = ", ".join(f"{k} {previous[k]} (now {resolved[k]})" for k in changed)
        flags = " ".join(f"--{k.replace('_', '-')} {previous[k]}" for k in changed)
        raise RunDirectoryError(f"--resume: the run in {out} trained with {diffs}; resume it the same way: {flags}")


def with_started_batch_size(config: FinetuneConfig) -> FinetuneConfig:
    """A run resumed with --batch-size left at auto keeps the number it started with, if it started with one
    (given explicitly, or the fixed default of earlier versions)."""
    saved = Path(config.output_dir) / RUN_CONFIG
    if not (config.resume and config.batch_size == "auto" and saved.is_file()):
        return config
    started = json.loads(saved.read_text()).get("batch_size")
    return replace(config, batch_size=started) if isinstance(started, int) else config


def saved_resolved(out: Path) -> dict[str, str]:
    """What the run in `out` recorded its "auto" settings to resolve to when it started (empty if nothing)."""
    return json.loads((out / RUN_CONFIG).read_text()).get("resolved") or {}


def eval_split_seed(config: FinetuneConfig) -> int:
    """The seed of the held-out split: fixed for new runs; a resumed run keeps the one it started
    with (runs that predate the record split by their --seed)."""
    if not config.resume:
        return EVAL_SPLIT_SEED
    saved = json.loads((Path(config.output_dir) / RUN_CONFIG).read_text())
    return saved.get("eval_split_seed", saved.get("seed", 0))


def prepare_output_dir(config: FinetuneConfig, world: int = 1, fingerprint: dict[str, str] | None = None,
                       resolved: dict[str, str] | None = None) -> Path:
    """Create the run folder, replacing te-llama's own files of a previous run when allowed.

    Call after `check_output_dir`; rechecks, since time passed while the model and data loaded.
    """
    check_output_dir(config, world)
    out = Path(config.output_dir)
    if config.resume:
        return out
    if out.is_dir() and any(out.iterdir()):
        logger.info("replacing the te-llama run in %s%s", out, "" if has_progress(out) else
                    " (it stopped before its first checkpoint)")
        for entry in [e for e in out.iterdir() if _own(e.name, OWN_ENTRIES)]:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    out.mkdir(parents=True, exist_ok=True)
    save_config(config, out / RUN_CONFIG, world_size=world, fingerprint=fingerprint, resolved=resolved)
    return out


def resume_command() -> str:
    """This process's te-llama command with --resume (and without --overwrite), to continue the run."""
    argv = [a for a in sys.argv[1:] if a != "--overwrite"]
    return " ".join(["te-llama", *argv, *([] if "--resume" in argv else ["--resume"])])
