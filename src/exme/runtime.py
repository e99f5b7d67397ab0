"""Process-wide settings every command shares: the device check, and how chatty libraries may be.

Why here and not per command: a device that cannot work (``--device cuda`` on a CPU-only torch)
must be refused before any folder is created or any model is read, whatever the command; and the
noise of the libraries exme drives (transformers' per-load "Loading weights" bar, its info
messages, the merge engine's notes) is one switch, ``--verbose``.
"""

from __future__ import annotations

import logging
import re

from exme.errors import ExmeError

__all__ = ["check_device", "is_verbose", "set_verbose"]

_VERBOSE = False


def set_verbose(verbose: bool) -> None:
    """Quiet (default) or chatty: transformers' loading bars and info logs, engine notes, Trainer logs."""
    global _VERBOSE
    _VERBOSE = bool(verbose)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    if _VERBOSE:
        hf_logging.set_verbosity_info()
        hf_logging.enable_progress_bar()
    else:
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    for name in ("lm_eval", "lm-eval", "optuna"):
        logging.getLogger(name).setLevel(logging.INFO if _VERBOSE else logging.WARNING)
    _quiet_library_deprecations(not _VERBOSE)


# Deprecation notices the libraries raise about their own internals (e.g. transformers'
# "`is_gradient_checkpointing` is deprecated" during a PEFT run): nothing a user of exme can act on.
_LIBRARIES = r"(transformers|peft|accelerate|huggingface_hub)(\.|$)"
_DEPRECATIONS = (FutureWarning, DeprecationWarning)


def _quiet_library_deprecations(quiet: bool) -> None:
    """Hide (quiet) or show again (verbose: Python's default, once per place) the libraries' own
    FutureWarning/DeprecationWarning. The newest filter wins, so switching back and forth works."""
    import warnings

    for category in _DEPRECATIONS:
        warnings.filterwarnings("ignore" if quiet else "default", category=category, module=_LIBRARIES)


def is_verbose() -> bool:
    """Whether ``--verbose`` was given (library notes and bars are shown)."""
    return _VERBOSE


def check_device(device: str, *, option: str = "--device") -> str:
    """Refuse a device this torch cannot use, in one line, before any work: returns ``device``.

    Accepts ``cpu``, ``cuda``, ``cuda:N``, ``mps`` and (where a command allows it) ``auto``.
    """
    import torch

    if device == "auto":
        return device
    if not re.fullmatch(r"cpu|mps|cuda(:\d+)?", device):
        raise ExmeError(f"{option} {device!r} is not a device; use cpu, cuda, cuda:N or mps")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "a CPU-only build" if torch.version.cuda is None else "a CUDA build, but no GPU is visible"
            raise ExmeError(
                f"{option} {device}: CUDA is not available (this torch {torch.__version__} is {why}); use "
                "--device cpu, or install a CUDA build of torch on a machine with a GPU"
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ExmeError(
                f"{option} {device}: only {torch.cuda.device_count()} CUDA device(s) are visible (cuda:0 .. "
                f"cuda:{torch.cuda.device_count() - 1})"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ExmeError(f"{option} mps: MPS is not available on this machine; use --device cpu")
    return device
