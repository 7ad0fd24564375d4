"""Run a command and restart it when it dies unexpectedly: `python -m devservers.keepalive -- CMD ARGS...`.

honcho stops every process as soon as one exits, and Celery 5.7's worker sometimes exits when the
broker goes away under load (see FIELD-NOTES). Wrapped in this, a crashed worker or relay comes back
after a short, growing delay instead of taking the whole `make run` down.

- The child exits 0: keepalive exits 0 (the child chose to stop; nothing to restart).
- The child exits non-zero or is killed: it is restarted after `delay` seconds, doubling up to
  `max_delay`; the delay starts again from `delay` after a run that lasted `healthy_after` seconds.
- keepalive gets SIGTERM or SIGINT: the child gets SIGTERM (the graceful stop of uvicorn, Celery and the
  relay; a second SIGINT would turn Celery's warm shutdown into a cold one), keepalive waits for it and
  exits without restarting. A second signal kills the child.
"""

from __future__ import annotations

import argparse
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from types import FrameType


class KeepAlive:
    """Supervises one command; see the module docstring for the policy."""

    def __init__(self, command: Sequence[str], delay: float, max_delay: float, healthy_after: float) -> None:
        self._command = list(command)
        self._delay = delay
        self._max_delay = max_delay
        self._healthy_after = healthy_after
        self._child: subprocess.Popen[bytes] | None = None
        self._signals = 0

    def run(self) -> int:
        """Run until the child exits 0 or keepalive is told to stop; return the exit code to use."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        delay = self._delay
        while not self._signals:
            started = time.monotonic()
            # The child stays in keepalive's process group, so honcho's SIGKILL to the group reaches it too.
            self._child = subprocess.Popen(self._command)
            returncode = self._child.wait()
            if self._signals:
                return 0 if returncode in (0, -signal.SIGTERM, -signal.SIGINT) else _exit_code(returncode)
            if returncode == 0:
                return 0
            if time.monotonic() - started >= self._healthy_after:
                delay = self._delay
            self._say(f"{self._command[0]} exited with {_describe(returncode)}; restarting in {delay:g}s")
            if not self._sleep(delay):
                return 0
            delay = min(delay * 2, self._max_delay)
        return 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        child = self._child
        if child is None or child.poll() is not None:
            return
        child.send_signal(signal.SIGTERM if self._signals == 1 else signal.SIGKILL)

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless told to stop meanwhile; True when the sleep ran its course."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._signals:
                return False
            time.sleep(min(0.1, max(deadline - time.monotonic(), 0)))
        return not self._signals

    @staticmethod
    def _say(message: str) -> None:
        print(f"keepalive: {message}", file=sys.stderr, flush=True)


def _describe(returncode: int) -> str:
    if returncode < 0:
        return f"signal {signal.Signals(-returncode).name}"
    return f"status {returncode}"


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devservers.keepalive", description=__doc__.splitlines()[0])
    parser.add_argument("--delay", type=float, default=1.0, help="first restart delay in seconds (default 1)")
    parser.add_argument("--max-delay", type=float, default=30.0, help="longest restart delay (default 30)")
    parser.add_argument("--healthy-after", type=float, default=60.0, help="a run this long resets the delay")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to supervise")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given (usage: python -m devservers.keepalive -- CMD ARGS...)")
    return KeepAlive(command, args.delay, args.max_delay, args.healthy_after).run()


if __name__ == "__main__":
    sys.exit(main())
