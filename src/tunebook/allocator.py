"""The memory allocator CPU training runs on: one that gives freed memory back to the system, where one is found.

glibc's malloc keeps most of what a training step frees: the packed rows differ in length from step to step, so
every step's activation buffers have new sizes, and the freed blocks stay in glibc's heaps as fragments. Over the
smollm2-sql demo's 220 steps its resident memory grew to 5.4 GiB for a 135M model (docs/performance.md).
jemalloc and mimalloc return freed pages and keep RSS near what is in use. An allocator can only be chosen before
the process starts (LD_PRELOAD), so the `tunebook` command starts itself again with it: `prepare()` below.

Where it comes from, first found wins: `TUNEBOOK_MALLOC` (a library path, or `system` for glibc's malloc);
Debian's `libjemalloc2`; the `cmeel-mimalloc` wheel, which tunebook's install brings on Linux. jemalloc comes
first because it measured best (docs/performance.md#the-allocator): in 40-step smollm2-sql runs it was both faster
and smaller than glibc's malloc; mimalloc was as fast as glibc's and smaller.
"""

from __future__ import annotations

import glob
import os
import sys
import sysconfig
from dataclasses import asdict, dataclass
from pathlib import Path

ENV = "TUNEBOOK_MALLOC"
_CHOSEN = "TUNEBOOK_MALLOC_CHOSEN"  # set on the restarted process, so it restarts once at most
SYSTEM_JEMALLOC = ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
                   "/usr/lib64/libjemalloc.so.2", "/usr/lib/libjemalloc.so.2")
# The commands whose memory an allocator changes: they train (demo trains, then evaluates in the same process).
COMMANDS = ("train", "demo")


@dataclass(frozen=True)
class Allocator:
    name: str  # mimalloc | jemalloc | glibc | the file's name
    path: str | None
    why: str


def find() -> Allocator:
    """The allocator tunebook would start a training command with on this machine."""
    wanted = os.environ.get(ENV, "").strip()
    if wanted == "system":
        return Allocator("glibc", None, f"{ENV}=system")
    if wanted:
        if not Path(wanted).is_file():
            from tunebook.errors import RecipeError

            raise RecipeError("environment", ENV, f"{wanted!r} is not a file.",
                              f"Point it at a malloc library (e.g. {SYSTEM_JEMALLOC[0]}), or set {ENV}=system "
                              "for the system's malloc.")
        return Allocator(_name(wanted), wanted, f"{ENV}={wanted}")
    if not sys.platform.startswith("linux"):
        return Allocator("system", None, "LD_PRELOAD is Linux's; this platform's own malloc")
    for path in SYSTEM_JEMALLOC:
        if Path(path).is_file():
            return Allocator("jemalloc", path, "the system's libjemalloc2: returns freed memory to the system")
    purelib = sysconfig.get_paths()["purelib"]
    for path in sorted(glob.glob(os.path.join(purelib, "cmeel.prefix", "lib", "libmimalloc.so*"))):
        return Allocator("mimalloc", path, "from the cmeel-mimalloc wheel (no libjemalloc2 here): returns freed "
                                           "memory to the system")
    return Allocator("glibc", None, "no mimalloc or jemalloc found (pip install cmeel-mimalloc, or apt install "
                                    "libjemalloc2): glibc's malloc, whose RSS grows over long runs")


def in_use() -> Allocator:
    """The allocator this process runs on, read from its own memory map."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return Allocator("system", None, "no /proc/self/maps to read")
    for line in maps.splitlines():
        path = line.split()[-1] if line.split() else ""
        if "libmimalloc" in path or "libjemalloc" in path:
            return Allocator(_name(path), path, os.environ.get(_CHOSEN) or "preloaded by whoever started tunebook")
    return Allocator("glibc", None, os.environ.get(_CHOSEN) or "the system's malloc")


def preloaded_env(allocator: Allocator, env: dict[str, str] | None = None) -> dict[str, str]:
    """`env` (default: this process's) with `allocator` first in LD_PRELOAD."""
    env = dict(os.environ if env is None else env)
    if allocator.path:
        env["LD_PRELOAD"] = ":".join(p for p in (allocator.path, env.get("LD_PRELOAD", "")) if p)
    env[_CHOSEN] = allocator.why
    return env


def prepare(command: str, argv: list[str]) -> None:
    """For a training command started from the shell, start it again on `find()`'s allocator (once; no return).

    Does nothing when the command does not train, when the process already runs on a replacement allocator, when
    none is found, or when this process was itself restarted."""
    if command not in COMMANDS or _CHOSEN in os.environ or in_use().path:
        return
    chosen = find()
    if chosen.path is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", "tunebook", *argv], preloaded_env(chosen))


def as_dict(allocator: Allocator) -> dict[str, str | None]:
    return asdict(allocator)


def _name(path: str) -> str:
    base = Path(path).name
    return next((n for n in ("mimalloc", "jemalloc", "tcmalloc") if n in base), base)
