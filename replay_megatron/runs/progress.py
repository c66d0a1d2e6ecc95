"""Progress of a long run on rank 0: a tqdm bar on a terminal, else a plain line every `every` updates.

Logs of cluster jobs are files, where a bar's carriage returns turn into noise; a periodic line reads well
there. Other ranks show nothing.
"""
from __future__ import annotations

import sys
from typing import Any, Callable


class Progress:
    """`update(n, postfix, line)` advances by n; `line()` is printed every `every` updates and at the end
    when stderr is not a terminal, `postfix` (a dict) shown on the bar when it is."""

    def __init__(self, desc: str, unit: str, *, total: int, initial: int = 0, every: int = 1,
                 show: bool = True) -> None:
        from tqdm import tqdm

        self.desc, self.total, self.done, self.every, self.show = desc, total, initial, max(every, 1), show
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit) if show and sys.stderr.isatty() \
            else None

    def update(self, n: int = 1, *, postfix: dict[str, Any] | None = None,
               line: Callable[[], str] | None = None) -> None:
        self.done += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)
        elif self.show and (self.done % self.every < n or self.done == self.total):
            print(f"[{self.desc}] " + (line() if line else f"{self.done}/{self.total}"), flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
