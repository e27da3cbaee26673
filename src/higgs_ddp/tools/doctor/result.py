"""One line of the doctor's report, and what every check file shares: OK / WARN / FAIL, ``Result``,
``_first_line``."""

from __future__ import annotations

from dataclasses import dataclass

OK, WARN, FAIL = "OK", "WARN", "FAIL"


@dataclass
class Result:
    status: str  # OK | WARN | FAIL
    message: str  # "what" for OK, "what: the fix" for WARN / FAIL

    def line(self) -> str:
        return f"{self.status:<4} {' '.join(str(self.message).split())}"  # always one line


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
