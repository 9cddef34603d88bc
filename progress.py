"""Progress bars that read well in a terminal and in a log file: one home for every command's progress.

In a terminal, tqdm's bar redraws itself in place. When the output is a file (a cluster job's log, `> log.txt`),
redraws are carriage returns that pile up into one enormous line, so there the bar is written as a whole line
every LINE_EVERY seconds, and once more when it closes; a task done sooner writes none.
"""
import sys
import time

from tqdm import tqdm

LINE_EVERY = 60.0  # seconds between progress lines in a log file
LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} {unit} [{elapsed} elapsed, {remaining} left, {rate_fmt}{postfix}]"
OPEN_FORMAT = "{desc}: {n_fmt} {unit} [{elapsed} elapsed, {rate_fmt}{postfix}]"  # total not known yet


class LogLines(tqdm):
    """tqdm that writes a line (no carriage return, no clearing) every LINE_EVERY seconds, and at close if it wrote one."""

    def __init__(self, *args, **kwargs):
        self._line_at = time.monotonic()  # when the last line was written (none yet: a short task writes none)
        self._lines = 0
        super().__init__(*args, **kwargs)

    def display(self, msg=None, pos=None):
        now = time.monotonic()
        if now - self._line_at < LINE_EVERY:
            return True
        self._lines += 1
        self._line_at = now
        self.bar_format = LINE_FORMAT if self.total else OPEN_FORMAT
        self.fp.write((msg if msg is not None else self.__str__()).strip() + "\n")
        self.fp.flush()
        return True

    def clear(self, nolock=False):
        pass  # nothing drawn in place, nothing to clear

    def moveto(self, n):
        pass

    def close(self):
        if self.disable:
            return
        if self.leave is not False and self._lines:  # the last count, once, after a task long enough to have lines
            self._line_at = -LINE_EVERY
            self.display()
        self.disable = True
        self._decr_instances(self)


def write_line(text, file=None):
    """A line above any live bar (tqdm.write), or simply a line in a log file."""
    tqdm.write(text, file=file or sys.stderr)


def progress_bar(iterable=None, file=None, **kwargs):
    """tqdm(iterable, **kwargs) on `file` (stderr): a live bar in a terminal, a line a minute in a file."""
    file = file or sys.stderr
    if getattr(file, "isatty", lambda: False)():
        return tqdm(iterable, file=file, dynamic_ncols=True, **kwargs)
    return LogLines(iterable, file=file, **kwargs)
