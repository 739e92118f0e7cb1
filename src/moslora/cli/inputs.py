"""What a command reads and writes, checked before any slow work starts.

A mistyped path must be reported at once, not after a model has loaded for half a minute. Only
cheap checks live here (files exist, an output folder is new, the extras a model needs); what a
file holds is checked by the code that reads it.
"""

from __future__ import annotations

from pathlib import Path

from moslora.cli.extras import require_for_model
from moslora.io.atomic import check_new_directory
from moslora.train.model import check_source


def check_inputs(model: str | None, quantize: str | None = None, *, data: str | None = None, data_folder: str | None = None,
                 adapter: str | None = None, merged_output: str | None = None) -> None:
    """What a run reads and writes, checked before anything loads: the model (a local file or folder
    must exist; the extras it needs), the data file or folder, the adapter folder, and that
    ``--merged-output`` is a new folder. ``None`` skips a check."""
    if model is not None:
        check_source(model, quantize)
        require_for_model(model, quantize)
    if data is not None and not Path(data).is_file():
        raise FileNotFoundError(f"--data: file {data!r} does not exist")
    if data_folder is not None and not Path(data_folder).is_dir():
        raise FileNotFoundError(f"--data: folder {data_folder!r} does not exist")
    if adapter is not None and not Path(adapter).is_dir():
        raise FileNotFoundError(f"--adapter: folder {adapter!r} does not exist")
    if merged_output is not None:
        check_new_directory(merged_output)
