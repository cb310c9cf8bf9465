"""Progress bars for long work: a bar on a terminal, nothing when stderr is piped."""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, desc: str) -> Iterator[Callable[[int], None] | None]:
    """Yield an ``update(n_bytes)`` callable, or None when there is no terminal to draw on."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    # A terminal that reports no size (a fresh pseudo-terminal, `script` without a tty) gives
    # tqdm 0 columns and 0 rows, and it draws nothing: use $COLUMNS/$LINES or 80 x 24 then.
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        size = os.terminal_size((0, 0))
    sized = size.columns > 0 and size.lines > 0
    fallback = shutil.get_terminal_size()  # $COLUMNS / $LINES, else 80 x 24
    fixed = {} if sized else {"ncols": fallback.columns, "nrows": fallback.lines}
    with tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=sized,
        **fixed,
    ) as bar:
        yield bar.update
