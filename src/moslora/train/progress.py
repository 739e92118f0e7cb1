"""Progress bars that stay compact when the output is not a terminal.

On a terminal tqdm redraws one line in place. Written to a file (``moslora train ... > log``, a
job scheduler) every redraw is kept, so a bar that redraws each step leaves one segment per step.
Off a terminal a bar of long work redraws at most every :data:`PIPED_REFRESH_SECONDS`, and short
sub-bars (an evaluation pass inside training) are not drawn at all.
"""

from __future__ import annotations

import sys

PIPED_REFRESH_SECONDS = 30.0


def on_terminal() -> bool:
    """Whether progress bars (drawn on stderr) are seen on a terminal."""
    return sys.stderr.isatty()


def compact(bar):
    """``bar`` (a tqdm bar), set to redraw at most every :data:`PIPED_REFRESH_SECONDS` off a terminal."""
    if bar is not None and not on_terminal():
        bar.mininterval = PIPED_REFRESH_SECONDS
    return bar
