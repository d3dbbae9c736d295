"""The check's subprocesses: their environment, their logs, a timeout that kills the whole
process tree, the launchers as modules of this interpreter, DeepSpeed's CPU-op build, and
reading back what a run printed."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from ...errors import first_line
from .spec import BUILD_TIMEOUT_S, MIN_START_S, REPO, Ctx


def child_env(cpu: bool) -> dict:
    env = dict(os.environ)
    # a check started under a launcher must not hand its rank variables to the runs it starts
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
              "MASTER_PORT"):
        env.pop(k, None)
    bin_dir = str(Path(sys.executable).parent)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH"))
                                              if p),
                "PATH": f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"})
    if cpu:
        # one thread per process (several processes share 2 cores); no GPU even if one exists
        env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                    "CUDA_VISIBLE_DEVICES": ""})
    return env


# the launchers as modules of this interpreter: packages installed with --target (or without
# their scripts on PATH) still start them
TORCHRUN = (sys.executable, "-m", "torch.distributed.run")
DEEPSPEED = (sys.executable, "-m", "deepspeed.launcher.runner")
# DeepSpeed's CPU ops (DeepSpeedCPUAdam for the offloading profile; the shared-memory comm op on
# a CPU) built once, before the timed cases, instead of inside the first case's timeout
PREBUILD = ("import sys\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "acc = get_accelerator()\n"
            "for name in sys.argv[1:]:\n"
            "    acc.create_op_builder(name).load()\n"
            "    print('built', name, flush=True)\n")
PREBUILD_OPS = {"cpu": ("CPUAdamBuilder", "ShareMemCommBuilder"), "cuda": ("CPUAdamBuilder",)}
BUILT_OPS = ("cpu_adam", "deepspeed_shm_comm")  # their torch-extensions directory names


def clear_build_locks(env: dict) -> list[str]:
    """Removes the torch-extensions build locks a killed build leaves behind (the next build of
    the same op would wait on them for ever); returns what it removed."""
    # here, not at the top: the import costs ~1 s, and only a killed op build needs it
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(env.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    gone = []
    for lock in [p for op in BUILT_OPS for p in (*root.glob(f"{op}/lock"),
                                                 *root.glob(f"*/{op}/lock"))]:
        try:
            lock.unlink()
            gone.append(str(lock))
        except OSError:
            pass
    return gone


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def run_logged(cmd: list[str], env: dict, log_dir: Path,
               timeout: float) -> tuple[int | None, float]:
    """(exit code or None on timeout, seconds); stdout and stderr go to files in ``log_dir``
    (a full pipe would stall a chatty run). On timeout the whole process tree is killed, by pid:
    launchers' workers may sit in process groups of their own."""
    log_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log_dir / "stdout.log", "w") as out, open(log_dir / "stderr.log", "w") as err:
        try:
            p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err,
                                 start_new_session=True)
        except OSError as e:  # a launcher that is not there: the case fails, the check goes on
            err.write(f"error: cannot start {cmd[0]}: {e}\n")
            return 127, time.perf_counter() - t0
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            for pid in [*reversed(_descendants(p.pid)), p.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            p.wait()
            rc = None
    return rc, time.perf_counter() - t0



def read_log(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


# a launcher's one-line user error names the field first ("error: train.precision: ...")
_REFUSAL = re.compile(r"(?:^|\]:\s*)error: ((?:--[a-z_-]+|[a-z_]+\.[a-z_.]+): .*)$")


def refusal_line(stderr: str) -> str:
    for line in stderr.splitlines():
        m = _REFUSAL.search(line.strip())
        if m:
            return m.group(1)
    return ""


def shown(cmd: list[str]) -> str:
    """A command as one would type it in the repository root."""
    words = []
    for w in cmd:
        if w == sys.executable:
            w = "python"
        elif w.startswith(str(Path(sys.executable).parent) + os.sep):
            w = Path(w).name
        words.append(w.replace(str(REPO) + os.sep, ""))
    return shlex.join(words)


def tail(text: str, n: int = 15) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()][-n:]



def prebuild_ops(ctx: Ctx, say) -> str:
    """Builds DeepSpeed's CPU ops once; returns the report's line about it."""
    ops = PREBUILD_OPS["cpu" if ctx.cpu else "cuda"]
    left = ctx.deadline - time.monotonic()
    if left < MIN_START_S:
        return f"DeepSpeed CPU ops ({', '.join(ops)}): skipped (budget)"
    log = ctx.work / "prebuild"
    try:
        rc, wall = run_logged([sys.executable, "-c", PREBUILD, *ops], ctx.env, log,
                              min(BUILD_TIMEOUT_S, left))
    except Exception as e:
        rc, wall = -1, 0.0
        (log / "stderr.log").write_text(first_line(e, 10**6, typed=True) + "\n")
    if rc is None:
        clear_build_locks(ctx.env)
    what = ("built or found cached" if rc == 0 else
            "timed out (locks cleared)" if rc is None else
            f"failed, exit code {rc}: " + " / ".join(tail(read_log(log / "stderr.log"), 2)))
    line = f"DeepSpeed CPU ops ({', '.join(ops)}): {what}, {wall:.0f} s"
    say(f"gpu_check: {line}")
    return line

