"""Errors of the script that no caller gets (an `after` handler's, a thread's), logged without a flood.

Such an error may recur many times a second (a timer that fails and reschedules itself, a
worker sending one bad script after another). Each is logged whole (its message and errorInfo)
once a minute at its place, the repeats counted (repeats.Repeated). A place is what varying
data cannot vary: the message's kind (its numbers and quoted strings left out) and the
errorInfo's frames, each command by its name and the lines Tcl writes after it (``(procedure
"tick" line 3)``, ``("after" script)``); a command's words can be data (`after 10 [list expr
$x/0]`, `thread::send -async $t [list error $data]`), and keyed by them each failure was a
place of its own, logged whole. A message or a command name made of data (`error $data`,
`after 10 $data`) still makes new places: so at most :data:`PLACES` errors a minute are logged
whole in all, the others counted and told in one line.
"""

from __future__ import annotations

import logging
import re
from typing import Final

from ..logline import clip, escape, escape_lines
from ..repeats import Repeated, fault_kind

log: Final = logging.getLogger("pytclmilter")

#: Errors logged whole a minute, all places together.
PLACES: Final = 10
#: How errorInfo introduces each frame: the command, quoted, follows.
_FRAME: Final = re.compile(r'\n    (?:while executing|invoked from within)\n"')
#: Where the lines Tcl writes after a frame's command start (the last such in the frame).
_WHERE: Final = '"\n    ('
#: The frames a place keeps: the first (where it failed) and the last (the handler). An errorInfo
#: is the script's to give (`error msg $info`), of any length: a place is kept while it counts.
PLACE_FRAMES: Final = (10, 5)


def _told(_repeated: Repeated, label: str, count: int) -> None:
    """The count of an error no caller answers (``label``: what it is and its escaped message)
    logged once a minute: with the next such error, or alone once the minute is over
    (repeats.tell_counts)."""
    log.error("%s (repeated %d times since its last line with the trace; logged once a minute)", label, count)


def _others_told(_repeated: Repeated, label: str, count: int) -> None:
    """The count of errors not logged because PLACES were logged whole within the minute."""
    log.error("%s (the last of %d errors not logged: at most %d a minute are logged with their trace)",
              label, count, PLACES)


class Unanswered:
    """One kind of error no caller gets (a background error, a thread's), each logged as
    ``what: MESSAGE`` and its errorInfo; counted, not logged, as the module says."""

    def __init__(self) -> None:
        self.places = Repeated(tell=_told)
        self.others = Repeated(whole=PLACES, tell=_others_told)

    def log(self, what: str, message: str, info: str, where: str | None = None) -> None:
        """Log the error ``message`` with its errorInfo ``info`` (``what``: escaped), or count it.
        ``where``: its place, when ``info`` is no errorInfo (a Python traceback). The line logged
        now quotes the message whole; the label kept for the count's line, clipped: up to 100
        places are kept, and a script's 1 MB messages kept 100 MB."""
        if self.due(f"{what}: {escape(clip(message))}", message, info, where):
            log.error("%s: %s%s", what, escape(message), "\n" + escape_lines(info) if info else "")

    def due(self, label: str, message: str, info: str, where: str | None = None) -> bool:
        """Whether to report this error whole now (``label``: its escaped first line); else it is
        counted, and the count told in a line of ``label`` later. Also the counts held back by
        the last reports, told now."""
        where = place(info, message) if where is None else where
        due = self.places.due(where, label)
        if due:
            _told(self.places, label, due)
        if due != 0:
            return False
        missed = self.others.due("", label)
        if missed is None:  # the cap's to count, this and its repeats: none was logged whole
            self.places.forget(where)
            return False
        if missed:
            _others_told(self.others, label, missed)
        return True


def place(info: str, message: str) -> str:
    """Where an error happened and what it is: the kind of its ``message`` (fault_kind: `error
    "boom $i"` one kind) and, from its errorInfo ``info``, each frame's command name and the
    lines after it, of the first and last PLACE_FRAMES frames (two errors alike there are one)."""
    frames = _FRAME.split(info)[1:]
    first, last = PLACE_FRAMES
    if len(frames) > first + last:
        frames = frames[:first] + frames[-last:]
    return "\n".join([fault_kind(clip(message))] + [_frame_place(frame) for frame in frames])


def _frame_place(frame: str) -> str:
    """A frame's command (up to its quote, the rest of the frame after) as its first word and the
    lines Tcl wrote after it, both clipped: Tcl cuts its own (a proc's name at 60 characters), a
    script's errorInfo need not."""
    where = frame.rfind(_WHERE)
    words = frame[:where if where >= 0 else len(frame)].split(maxsplit=1)
    return f"{clip(words[0]) if words else ''}{clip(frame[where + 1:]) if where >= 0 else ''}"


def message_of(info: str) -> str:
    """The error message an errorInfo begins with: up to its first frame, else its first line."""
    found = _FRAME.search(info)
    return info[:found.start()] if found else info.split("\n", 1)[0]
