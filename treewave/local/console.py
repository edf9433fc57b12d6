"""What a local run tells its user: one progress line rewritten in place on a terminal,
and whole lines (news on stdout, trouble on stderr) that first close that line."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

__all__ = ["Console", "Progress"]


class Progress:
    """One progress line: rewritten in place on a terminal, printed when it changes
    otherwise."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.last = ""
        self.open = False

    def update(self, text: str) -> None:
        if text == self.last:
            return
        self.last = text
        if self.tty:
            self.out.write("\r\x1b[K" + text)
            self.open = True
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.open:
            self.out.write("\n")
            self.out.flush()
            self.open = False
        self.last = ""


@dataclass
class Console:
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    def __post_init__(self) -> None:
        self.progress = Progress(self.out)

    def say(self, text: str) -> None:
        self.progress.done()
        print(text, file=self.out, flush=True)

    def warn(self, text: str) -> None:
        self.progress.done()
        print(text, file=self.err, flush=True)
