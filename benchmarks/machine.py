"""Machine information every benchmark prints, and the precision choice made from it.

One place for: the CPU model (``lscpu``), torch's CPU capability, AMX yes/no
(``sdcore.precision.cpu_flags``), the measured fp32 and bf16 matmul peaks
(``sdcore.precision.matmul_gflops``), the load average and the date. Benchmarks choose their
contenders' precision from those peaks: bf16 contenders run only where bf16 matmul is faster than
fp32 (AMX Xeons, AMD EPYCs with AVX-512 BF16), never on a CPU where bf16 is narrow (Xeons with
AVX-512 but no AMX) or emulated (AVX2).

    from benchmarks.machine import MachineInfo
    machine = MachineInfo.measure()
    machine.print()                       # the header lines
    if machine.bf16_is_fast: ...          # run the bf16 contenders
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

# `python benchmarks/x.py` puts benchmarks/ on sys.path, not the repository root.
REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from sdcore.precision import cpu_flags, matmul_gflops, onednn_linear_gflops  # noqa: E402

PEAK_MATMUL_SIZE = 2048  # large enough to reach the kernel's peak, small enough to measure in ~1 s


def cpu_model() -> str:
    """The ``Model name`` line of ``lscpu`` (with the model number where lscpu gives one)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown (lscpu failed)"
    fields = {}
    for line in out.splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("Model name", "unknown")
    if fields.get("Model"):
        name += f" (model {fields['Model']})"
    return name


def load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


@dataclass(frozen=True)
class MachineInfo:
    cpu: str
    capability: str
    amx: bool
    threads: int
    fp32_gflops: float
    bf16_gflops: float
    onednn_fp32_gflops: float  # sdcore's onednn_linear path, at the fp32 matmul's product
    date: str
    load: float

    @classmethod
    def measure(cls, size: int = PEAK_MATMUL_SIZE, seconds: float = 0.5) -> "MachineInfo":
        flags = cpu_flags()
        return cls(cpu=cpu_model(), capability=torch.backends.cpu.get_cpu_capability(),
                   amx="amx_bf16" in flags, threads=torch.get_num_threads(),
                   fp32_gflops=matmul_gflops(torch.float32, size, seconds),
                   bf16_gflops=matmul_gflops(torch.bfloat16, size, seconds),
                   onednn_fp32_gflops=onednn_linear_gflops(size, seconds),
                   date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                   load=load_average())

    @property
    def bf16_is_fast(self) -> bool:
        """bf16 contenders are worth running only where bf16 matmul beats fp32."""
        return self.bf16_gflops > self.fp32_gflops

    @property
    def best_precision(self) -> str:
        return "bf16" if self.bf16_is_fast else "fp32"

    def peak_gflops(self, precision: str) -> float:
        """The faster kernel's: in fp32 the BLAS sgemm or oneDNN (twice as fast on AMD EPYCs)."""
        return self.bf16_gflops if precision == "bf16" else max(self.fp32_gflops, self.onednn_fp32_gflops)

    def line(self) -> str:
        """The one-line machine description of the README tables."""
        return (f"{self.cpu}, {self.threads} threads, capability {self.capability}, "
                f"AMX {'yes' if self.amx else 'no'}, matmul fp32 {self.fp32_gflops:.0f} (oneDNN "
                f"{self.onednn_fp32_gflops:.0f}) / bf16 {self.bf16_gflops:.0f} GFLOP/s, torch {torch.__version__}")

    def print(self) -> None:
        print(f"date: {self.date}")
        print(f"CPU: {self.cpu}")
        print(f"torch.backends.cpu.get_cpu_capability(): {self.capability}")
        print(f"AMX: {'yes' if self.amx else 'no'}  (sdcore.precision.cpu_flags)")
        print(f"torch {torch.__version__}, {self.threads} threads, "
              f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        print(f"measured matmul peak ({PEAK_MATMUL_SIZE}^3, sdcore.precision.matmul_gflops): "
              f"fp32 {self.fp32_gflops:.0f} GFLOP/s (oneDNN's, sdcore.precision.onednn_linear_gflops: "
              f"{self.onednn_fp32_gflops:.0f}), bf16 {self.bf16_gflops:.0f} GFLOP/s -> "
              + ("bf16 contenders run (bf16 is faster here)" if self.bf16_is_fast else
                 "bf16 contenders skipped (bf16 is not faster than fp32 here)"))
        quiet = "quiet" if self.load < 1.0 else "BUSY: other processes share the CPU, figures are pessimistic"
        print(f"load average (1 min) at start: {self.load:.2f} ({quiet})")
        print(f"machine: {self.line()}")
        sys.stdout.flush()
