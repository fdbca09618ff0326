"""Progress lines of long loops: durations for ETAs and the process's peak memory."""

import resource
import sys


def format_duration(seconds: float) -> str:
    """Compact duration: 45s, 1m20s, 2h03m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def peak_rss_mib() -> float:
    """This process's peak resident memory so far in MiB (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10
