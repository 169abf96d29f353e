"""Errors a user can act on: each names what is wrong and how to fix it."""


class TeLlamaError(Exception):
    """Base class for every error te-llama raises on bad input."""


class UnsupportedArchitectureError(TeLlamaError, ValueError):
    """The HF config describes something te-llama cannot run exactly (field and value named)."""


class WeightMappingError(TeLlamaError, KeyError):
    """A state dict has missing, unexpected or mis-shaped tensors (names and shapes given)."""

    def __str__(self) -> str:  # KeyError would quote the message; keep it readable
        return str(self.args[0]) if self.args else ""


class CheckpointError(TeLlamaError, ValueError):
    """A path is not a usable HF checkpoint directory, or a training checkpoint cannot be resumed."""


class DiskFullError(TeLlamaError, OSError):
    """The disk filled up (ENOSPC, EDQUOT) while writing a checkpoint or an export: the folder,
    its free space, what is still intact and the fix are given. `errno` is the original one."""

    def __str__(self) -> str:  # OSError would prefix "[Errno 28]"; keep the message readable
        return str(self.strerror)


class BackendUnavailableError(TeLlamaError, RuntimeError):
    """The requested backend or precision cannot run here (no TE, no CUDA, no FP8 support)."""
