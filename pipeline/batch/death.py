"""Why a job's process died without a result, said only as far as there is evidence.

A process killed by SIGKILL may have been the kernel's OOM killer, an operator, or a supervisor;
the signal alone does not say which. The kernel counts the OOM kills in each memory cgroup: the
cgroup v2 ``memory.events`` (``oom_kill``) of this process's cgroup (where job processes run too),
or the cgroup v1 ``memory.oom_control``. They are read when a job starts; a job killed by SIGKILL
is called out of memory only if one rose while it ran. (The machine-wide ``/proc/vmstat`` count is
not used: it is not namespaced, so it counts other containers' kills too.) With several jobs at
once, a rise is the cgroup's: the message names the counter and says what it saw.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

_OOM_KEY = "oom_kill"
_PROC = Path("/proc")


@dataclass(frozen=True)
class OomCounter:
    """A kernel counter of OOM kills, as read at one moment.

    Attributes:
        path: The file it is read from.
        value: Its value then.
    """

    path: Path
    value: int

    def reread(self) -> OomCounter | None:
        """The same counter read now (None: no longer readable)."""
        value = _read_counter(self.path)
        return None if value is None else OomCounter(self.path, value)


def _read_counter(path: Path) -> int | None:
    """The ``oom_kill <n>`` line of a flat-keyed kernel file; None when unreadable or absent."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        key, _, value = line.partition(" ")
        if key == _OOM_KEY and value.strip().isdigit():
            return int(value)
    return None


@dataclass(frozen=True)
class _Mount:
    """A cgroup hierarchy as mounted: the cgroup at its mount point, and where that is."""

    root: str
    point: Path

    def file(self, cgroup: str, name: str) -> Path | None:
        """The file `name` of `cgroup` (a path in the hierarchy), if the mount shows that cgroup."""
        root = self.root.rstrip("/")
        if cgroup != root and not cgroup.startswith(f"{root}/"):
            return None
        return self.point / cgroup[len(root) :].lstrip("/") / name


def _cgroup_mounts(proc: Path) -> dict[str, _Mount]:
    """Mounts by hierarchy: ``"2"`` for cgroup v2, ``"memory"`` for the v1 memory controller."""
    mounts: dict[str, _Mount] = {}
    try:
        lines = (proc / "self" / "mountinfo").read_text().splitlines()
    except OSError:
        return mounts
    for line in lines:
        fields, _, tail = line.partition(" - ")
        parts, kinds = fields.split(), tail.split()
        if len(parts) < 5 or len(kinds) < 3:
            continue
        if kinds[0] == "cgroup2":
            mounts.setdefault("2", _Mount(parts[3], Path(parts[4])))
        elif kinds[0] == "cgroup" and "memory" in kinds[2].split(","):
            mounts.setdefault("memory", _Mount(parts[3], Path(parts[4])))
    return mounts


def counter_files(proc: Path = _PROC) -> list[Path]:
    """The kernel files that count OOM kills in this process's memory cgroup (v2, then v1); [] if none is mounted."""
    mounts = _cgroup_mounts(proc)
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        lines = []
    # "<id>:<controllers>:<cgroup>" per hierarchy; cgroup v2's line has no controllers.
    memberships = {parts[1]: parts[2] for parts in (line.split(":", 2) for line in lines) if len(parts) == 3}
    wanted = [("", "2", "memory.events"), ("memory", "memory", "memory.oom_control")]
    files = []
    for controllers, hierarchy, name in wanted:
        cgroup = next((path for names, path in memberships.items() if controllers in names.split(",")), None)
        mount = mounts.get(hierarchy)
        found = None if cgroup is None or mount is None else mount.file(cgroup, name)
        if found is not None:
            files.append(found)
    return files


def oom_counters(files: list[Path] | None = None) -> list[OomCounter]:
    """The readable OOM-kill counters now (take this when a job starts)."""
    found = []
    for path in counter_files() if files is None else files:
        value = _read_counter(path)
        if value is not None:
            found.append(OomCounter(path, value))
    return found


def oom_evidence(before: list[OomCounter]) -> str | None:
    """Which counter rose since `before` (the kernel's OOM killer killed a process meanwhile); None if none did."""
    for counter in before:
        now = counter.reread()
        if now is not None and now.value > counter.value:
            return f"{_OOM_KEY} in {counter.path} rose from {counter.value} to {now.value} during the job"
    return None


def death_cause(exitcode: int | None, oom: str | None = None) -> str:
    """The message for a job process that ended without a result.

    Args:
        exitcode: The process's exit code (negative: the signal that killed it).
        oom: The kernel's evidence of an OOM kill during the job (`oom_evidence`), if any.
    """
    if exitcode is None or exitcode >= 0:
        return f"the job's process exited with code {exitcode} without a result"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    if name != "SIGKILL":
        return f"the job's process died of {name}"
    if oom is not None:
        return f"the job's process was killed by SIGKILL: out of memory, the kernel's OOM killer ({oom})"
    return "the job's process was killed by SIGKILL (not by onnxforge; e.g. the kernel's OOM killer or an operator)"
