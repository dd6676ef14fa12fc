"""Which device the engines run on: CUDA when torch sees a GPU, else the CPU."""

from __future__ import annotations

from typing import Literal

Device = Literal["cpu", "cuda"]


def detect_device() -> Device:
    """CUDA when the installed torch sees a GPU; the CPU otherwise (a CPU build of torch included:
    it cannot drive a GPU even where one is present)."""
    try:
        import torch  # heavy: imported only when the device is asked for
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"
