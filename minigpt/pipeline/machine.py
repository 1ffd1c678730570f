"""What this machine has for a run: the memory it can still take, and the free disk of a folder.

Memory is the least of what Linux says in three places, plus what the process already holds (a run's
estimate counts the whole process):

    MemAvailable in /proc/meminfo           what new work can take without swapping (page cache included)
    a cgroup's memory.max - memory.current  a container's or a systemd slice's limit (cgroup v2; v1's
                                            memory.limit_in_bytes - memory.usage_in_bytes)
    RLIMIT_AS - VmSize                      an address-space limit (ulimit -v), under which NumPy raises
                                            MemoryError instead of the kernel killing the process

Elsewhere than Linux none of these can be read, and available_memory returns None: nothing is refused.
"""
import os
import resource
import shutil
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC = Path("/proc")
KB = 1024


def available_memory(proc=PROC, cgroup_root=CGROUP_ROOT):
    """(bytes the process may hold in all, what limits it: "MemAvailable", "the cgroup's limit" or
    "ulimit -v"), or None when no source can be read."""
    status = _status_fields(proc / "self" / "status")
    limits = []
    meminfo = _status_fields(proc / "meminfo")
    if "MemAvailable" in meminfo:
        limits.append((meminfo["MemAvailable"], "MemAvailable"))
    cgroup_room = _cgroup_room(proc / "self" / "cgroup", cgroup_root)
    if cgroup_room is not None:
        limits.append((cgroup_room, "the cgroup's limit"))
    address_limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if address_limit != resource.RLIM_INFINITY and "VmSize" in status:
        limits.append((max(0, address_limit - status["VmSize"]), "ulimit -v"))
    if not limits:
        return None
    room, source = min(limits)
    return status.get("VmRSS", 0) + room, source


def free_disk(path):
    """Free bytes on the filesystem that holds `path`, or would hold it: its nearest existing folder's."""
    return shutil.disk_usage(_nearest_existing(path)).free


def filesystem(path):
    """The device number of the filesystem that holds `path`, or would hold it."""
    return os.stat(_nearest_existing(path)).st_dev


def _nearest_existing(path):
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return path


def _status_fields(path):
    """{name: bytes} of the "Name:   123 kB" lines of /proc/meminfo or /proc/self/status; {} if unreadable."""
    fields = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return fields
    for line in lines:
        name, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name] = int(parts[0]) * KB
    return fields


def _cgroup_room(cgroup_file, cgroup_root):
    """The least room (limit - usage) of the process's memory cgroup and its parents; None without a limit."""
    try:
        lines = Path(cgroup_file).read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, group = line.split(":", 2)
        if controllers == "":                                      # cgroup v2: "0::/path"
            names, top = ("memory.max", "memory.current"), cgroup_root
        elif "memory" in controllers.split(","):                   # cgroup v1: "4:memory:/path"
            names, top = ("memory.limit_in_bytes", "memory.usage_in_bytes"), cgroup_root / "memory"
        else:
            continue
        folder = top / group.lstrip("/")
        for level in (folder, *folder.parents):                    # limits of parents count too
            room = _room(level, *names)
            if room is not None:
                rooms.append(room)
            if level == top:
                break
    return min(rooms) if rooms else None


def _room(folder, limit_name, usage_name):
    try:
        limit = (folder / limit_name).read_text().strip()
        usage = int((folder / usage_name).read_text().strip())
    except (OSError, ValueError):
        return None
    if not limit.isdigit() or int(limit) >= 1 << 60:                # "max", or v1's "no limit" near 2^63
        return None
    return max(0, int(limit) - usage)
