"""What the benchmark scripts share: device choice, step timing, peak memory, worker subprocesses, the report.

Scripts import it as `common` (`python benchmarks/<script>.py` puts benchmarks/ on sys.path). Only torch and
the standard library: the plain-PyTorch reference rows of a benchmark must not import lmpipe.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent


def pick_device(name: str) -> torch.device:
    """The device a --device flag names; `auto` is CUDA when present, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def sync(device: torch.device | None) -> None:
    """Wait for queued CUDA work so wall-clock times are real (nothing to wait for elsewhere)."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(step: Callable[[], object], steps: int, *, warmup: int = 0,
                 device: torch.device | None = None) -> list[float]:
    """Wall seconds of each of `steps` calls of step(), after `warmup` untimed calls (CUDA work waited for)."""
    for _ in range(warmup):
        step()
    seconds = []
    for _ in range(steps):
        sync(device)
        tick = time.perf_counter()
        step()
        sync(device)
        seconds.append(time.perf_counter() - tick)
    return seconds


def best_seconds(fn: Callable[[], object], repeats: int, *, warmup: int = 0,
                 device: torch.device | None = None) -> float:
    """The fastest of `repeats` timed calls of fn() (after `warmup` untimed ones)."""
    return min(step_seconds(fn, repeats, warmup=warmup, device=device))


def matmul_peak_flops(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Best-of-10 FLOP/s of an n x n x n matmul (2 n^3 FLOPs) on `device` in `dtype`: the MFU denominator."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / best_seconds(lambda: a @ b, 10, warmup=1, device=device)


def flops_per_token(num_params: int, num_layers: int, seq_len: int, d_model: int) -> int:
    """6N + 12*L*T*d training FLOPs per token (N without the input embedding table)."""
    return 6 * num_params + 12 * num_layers * seq_len * d_model


def current_rss_mib() -> float:
    """Resident set size of this process now (VmRSS), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mib(device: torch.device) -> float:
    """Peak memory so far: CUDA torch.cuda.max_memory_allocated; CPU this process's ru_maxrss (KiB on Linux)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class PeakMemory:
    """Peak memory of what runs after it is made: CUDA max_memory_allocated from a reset; on the CPU the process's
    high-water mark (torch libraries included) and its rise over the resident set at the start."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_before_mib = current_rss_mib()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def row(self) -> dict:
        """{"peak_mem_mib"}, and on the CPU also {"mem_delta_mib"} (peak minus the resident set at the start)."""
        peak = peak_mib(self.device)
        return {"peak_mem_mib": peak} if self.device.type == "cuda" else \
            {"peak_mem_mib": peak, "mem_delta_mib": peak - self.rss_before_mib}


MEMORY_METHOD = {"cuda": "torch.cuda.max_memory_allocated",
                 "cpu": "subprocess ru_maxrss (peak) and ru_maxrss - VmRSS before model build (delta)"}
"""How PeakMemory measures, per device type (for the report)."""


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none): how busy the shared machine was."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def spawn_worker(script: str, spec: dict, *, env: dict | None = None, cwd: Path | None = None,
                 show_stderr: bool = False) -> dict:
    """Run `python <script> --worker <spec as JSON>` in a fresh process (its own peak memory) and return the JSON
    its last stdout line prints. The repository is on its PYTHONPATH. show_stderr passes the worker's log through
    instead of keeping it for the error raised when the worker fails."""
    env = {**os.environ, **(env or {}),
           "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], stdout=subprocess.PIPE,
                          stderr=None if show_stderr else subprocess.PIPE, text=True, env=env, cwd=cwd, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {spec} failed (exit {done.returncode})"
                           + ("" if show_stderr else f":\n{done.stderr[-4000:]}"))
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_args(parser: argparse.ArgumentParser, worker: Callable[[dict], dict] | None = None) -> argparse.Namespace:
    """Add --json-out (and, with a `worker`, the hidden --worker of spawn_worker's protocol) and parse; a process
    started by spawn_worker runs `worker(spec)`, prints its JSON as the last stdout line and exits here."""
    parser.add_argument("--json-out", type=Path, default=None, help="also write the JSON report here")
    if worker is not None:
        parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if getattr(args, "worker", None) is not None:
        print(json.dumps(worker(json.loads(args.worker))))
        sys.exit(0)
    return args


def emit(report: dict, table: str, json_out: Path | str | None) -> None:
    """The benchmarks' common ending: the JSON report, a blank line, its Markdown table; the JSON also to json_out
    when given."""
    text = json.dumps(report, indent=2)
    print(text)
    print()
    print(table)
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
