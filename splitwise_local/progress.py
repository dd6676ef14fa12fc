"""Progress bars for long work (downloads, model conversion, benchmarks): shown on a terminal,
silent in logs.

One rule for the whole project, tqdm's own: a bar draws only when its stream is a terminal
(`disable=None`), so `make serve` in a shell shows it and CI logs and the launcher's log files
stay free of carriage-return noise. huggingface_hub's download bars follow it already;
transformers' (model conversion) are put under it by `library_bars`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm


class Progress(tqdm):
    """tqdm that draws only on a terminal; a drop-in `tqdm_class` for huggingface_hub."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("disable"):
            kwargs["disable"] = None  # tqdm: None means "only if the stream is a tty"
        super().__init__(*args, **kwargs)


@contextlib.contextmanager
def library_bars() -> Iterator[None]:
    """While active, the bars transformers draws follow `Progress`'s rule (huggingface_hub's
    already do: it passes `disable=None` itself).

    transformers' loaders take a creation hook for their bars; its GGUF converter builds a plain
    `tqdm` (always drawn, even into a log file), so that module's name is pointed at `Progress`
    for the duration.
    """
    import transformers.modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as transformers_logging

    gguf_tqdm = gguf_utils.tqdm
    gguf_utils.tqdm = Progress
    transformers_logging.set_tqdm_hook(lambda factory, args, kwargs: Progress(*args, **kwargs))
    try:
        yield
    finally:
        transformers_logging.set_tqdm_hook(None)
        gguf_utils.tqdm = gguf_tqdm
