"""One run per output folder: `aimv2 train --out DIR` holds DIR/.aimv2-train.lock while it runs.

The lock is a small JSON file (host, pid, start time, torchrun's run id, the command) created
atomically (O_CREAT | O_EXCL) by rank 0 before anything is read or written in DIR, refreshed (its
mtime) at every log interval, and removed when the run ends. A second run on the same folder, from
this host or another sharing the file system, is refused with one line naming the holder. A lock
whose holder is gone is taken over with a message:
- it belongs to this torchrun job (the same TORCHELASTIC_RUN_ID, i.e. `--rdzv-id`; not the default
  "none"): an elastic restart takes over from its predecessor, whichever node rank 0 lands on;
- same host: its pid no longer exists;
- another host (its pid cannot be checked from here): no refresh for STALE_S seconds.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import RunError

LOCK_NAME = ".aimv2-train.lock"
STALE_S = 900.0            # another host's lock not refreshed for this long is taken as dead


def _me() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "run_id": os.environ.get("TORCHELASTIC_RUN_ID"), "command": " ".join(sys.argv)[:500]}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:              # exists, another user's
        return True
    return True


def holder_gone(holder: dict, age_s: float, me: dict) -> str | None:
    """Why the lock's holder is gone (the lock may be taken over), or None while it may be running."""
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int):
        return None if age_s < 60 else f"an unreadable lock not refreshed for {age_s:.0f} s"
    if me["run_id"] not in (None, "", "none") and holder.get("run_id") == me["run_id"]:
        return f"a restart of the same torchrun job (run id {me['run_id']}), on any host"
    if holder.get("host") == me["host"]:
        if holder["pid"] == me["pid"]:
            return "held by this process (an earlier Trainer on this folder that was never run or closed)"
        if not _pid_alive(holder["pid"]):
            return f"pid {holder['pid']} is no longer running"
        return None
    if age_s > STALE_S:
        return f"not refreshed for {age_s / 60:.0f} minutes (> {STALE_S / 60:.0f}) by host {holder.get('host')}"
    return None


@dataclass
class RunLock:
    path: Path
    owner: dict

    @classmethod
    def acquire(cls, run_dir: Path, log=print) -> "RunLock":
        """Hold run_dir's lock, taking over one whose holder is gone; RunError while another run holds it."""
        run_dir.mkdir(parents=True, exist_ok=True)
        path, me = run_dir / LOCK_NAME, _me()
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                cls._take_over_or_refuse(path, me, log)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return cls(path, me)
        raise RunError(f"--out {str(run_dir)!r}: could not take the run lock {path} (another run keeps taking it)")

    @staticmethod
    def _take_over_or_refuse(path: Path, me: dict, log) -> None:
        try:
            age = time.time() - path.stat().st_mtime
            text = path.read_text()
        except FileNotFoundError:        # released meanwhile: try again
            return
        try:
            holder = json.loads(text)
        except ValueError:
            holder = None
        why = holder_gone(holder, age, me)
        if why is None:
            h = holder if isinstance(holder, dict) else {}
            raise RunError(f"--out {str(path.parent)!r} is in use by another run (host {h.get('host', '?')}, pid "
                           f"{h.get('pid', '?')}, started {h.get('started', '?')}; lock {path}): wait for it to end "
                           f"or choose another --out")
        stale = path.with_name(f"{LOCK_NAME}.stale-{me['pid']}")
        try:
            os.replace(path, stale)      # one taker wins the rename; the others retry and meet its lock
        except FileNotFoundError:
            return
        stale.unlink(missing_ok=True)
        h = holder if isinstance(holder, dict) else {}
        log(f"took over the run lock of {path.parent} from host {h.get('host', '?')} pid {h.get('pid', '?')} "
            f"(started {h.get('started', '?')}): {why}")

    def beat(self) -> None:
        """Refresh the lock (its mtime): the run is alive."""
        try:
            os.utime(self.path)
        except FileNotFoundError:
            pass

    def release(self) -> None:
        """Remove the lock if it is still this run's."""
        try:
            holder = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if holder.get("pid") == self.owner["pid"] and holder.get("host") == self.owner["host"]:
            self.path.unlink(missing_ok=True)
