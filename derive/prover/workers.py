"""Worker processes for ``derive verify --jobs N``: the checks of a run spread over N processes.

Each worker is a process of its own with a memory cap, so that a hostile expression can neither
eat the machine nor stop the run.  The parent watches each busy worker's resident memory (every
POLL_SECONDS) and stops a worker that grows more than ``memory_mb`` MiB past its size at start:
the check it was running gets a "memory limit" verdict, the worker is replaced by a fresh one,
and the run goes on.  (Stopping the process is what makes this robust: a Python process that
meets a hard allocation limit gets MemoryErrors while the exception unwinds too, in ``finally``
blocks and signal handlers, and can spin there.)  RLIMIT_AS, at twice the cap plus
AS_SLACK_MB, is only a backstop should the parent not look in time; a MemoryError inside a check
is a verdict of the engine, and a worker that dies anyway (killed, or aborted by a C library
that cannot allocate) is a "memory limit" verdict too.  A worker that gives no answer within a
wall-clock backstop far above its CPU-time budget is stopped the same way ("time limit").

The pool is deliberately small: one duplex pipe per worker, one task at a time per worker,
tasks handed out in the order given as soon as their dependencies are done (the domain checks of
a derivation before its steps), results returned by task id so that the caller reports them in
file order whatever the completion order.

Start method: ``fork`` when this process has a single thread (fast: the loaded files are
inherited), else ``forkserver`` (fork is unsafe once torch, JAX or any library has started
threads: a lock held by another thread at fork time stays held in the child forever);
``DERIVE_START_METHOD`` overrides.  The files are given to each worker once, at its start.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from multiprocessing.connection import wait

#: the default memory cap of one worker (MiB): a quarter of the machine's memory per worker
#: (shared among the workers), at most DEFAULT_MEMORY_MAX_MB and at least DEFAULT_MEMORY_MIN_MB
DEFAULT_MEMORY_MAX_MB = 4096
DEFAULT_MEMORY_MIN_MB = 512
#: how often the parent reads the busy workers' resident memory (seconds)
POLL_SECONDS = 0.05
#: the address-space backstop of a worker: its size at start + 2 * memory_mb + AS_SLACK_MB
AS_SLACK_MB = 256


def usable_cores() -> int:
    """The number of cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _total_memory_mb():
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1 << 20)
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_mb(jobs: int) -> int:
    """The memory cap of each of ``jobs`` workers (MiB): $DERIVE_WORKER_MEMORY_MB, else a share
    of the machine's memory (see DEFAULT_MEMORY_MAX_MB)."""
    env = os.environ.get("DERIVE_WORKER_MEMORY_MB", "").strip()
    if env:
        try:
            value = int(env)
            if value > 0:
                return value
        except ValueError:
            pass
    total = _total_memory_mb()
    if not total:
        return DEFAULT_MEMORY_MAX_MB
    return int(max(DEFAULT_MEMORY_MIN_MB, min(DEFAULT_MEMORY_MAX_MB, total * 3 // 4 // max(1, jobs))))


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        import threading

        return threading.active_count()


def start_method() -> str:
    forced = os.environ.get("DERIVE_START_METHOD", "").strip()
    methods = mp.get_all_start_methods()
    if forced in methods:
        return forced
    if "fork" in methods and _threads() == 1:
        return "fork"
    if "forkserver" in methods:
        return "forkserver"
    return "spawn"


def _address_space() -> int | None:
    """This process's current virtual memory size in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as fh:
            pages = int(fh.read().split()[0])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def resident(pid) -> int | None:
    """The resident memory of process ``pid`` in bytes (Linux), else None."""
    try:
        with open(f"/proc/{pid}/statm") as fh:
            pages = int(fh.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def cap_memory(memory_mb) -> bool:
    """Cap this process's address space at its present size plus ``memory_mb`` MiB (its imports
    are not counted against it).  False when the platform cannot (no /proc, no RLIMIT_AS)."""
    if not memory_mb:
        return False
    try:
        import resource
    except ImportError:
        return False
    now = _address_space()
    if now is None or not hasattr(resource, "RLIMIT_AS"):
        return False
    limit = now + int(memory_mb) * (1 << 20)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ValueError, OSError):
        return False
    return True


def _worker_main(conn, make_runner, runner_args, memory_mb):
    """A worker: answers (task id, payload) messages with (task id, result, recycle) until None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is the parent's: it stops the workers
    capped = cap_memory(2 * memory_mb + AS_SLACK_MB) if memory_mb else False
    runner = make_runner(*runner_args)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        tid, payload = msg
        recycle = False
        try:
            result = runner(payload)
        except MemoryError:
            result, recycle = ("error", "memory"), True
        except BaseException as exc:  # noqa: BLE001 - a worker answers, whatever happens
            result = ("error", f"{type(exc).__name__}: {exc}"[:300])
        if capped and _memory_limited(result):
            recycle = True
        try:
            conn.send((tid, result, recycle))
        except MemoryError:
            conn.send((tid, ("error", "memory"), True))
        except Exception as exc:  # an unpicklable result: say so, never hang the parent
            conn.send((tid, ("error", f"result cannot be sent: {type(exc).__name__}: {exc}"[:300]), False))


def _memory_limited(result) -> bool:
    text = repr(result)[-100_000:]
    return "memory limit" in text or "MemoryError" in text


class Died(Exception):
    """A worker stopped without answering: ``reason`` is "memory" or "time"; ``detail`` says how."""

    def __init__(self, reason, detail, seconds=0.0):
        super().__init__(detail)
        self.reason, self.detail, self.seconds = reason, detail, seconds


class _Worker:
    def __init__(self, ctx, make_runner, runner_args, memory_mb):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker_main, args=(child, make_runner, runner_args, memory_mb), daemon=True)
        self.proc.start()
        child.close()
        self.task = None  # (tid, payload, started, wall limit)
        self.base = None  # resident memory (bytes) before its first task

    def stop(self, kill=False):
        try:
            if kill:
                self.proc.kill()
            else:
                self.conn.send(None)
        except (OSError, ValueError):
            pass
        try:
            self.conn.close()
        except OSError:
            pass


def _signal_name(code):
    try:
        return signal.Signals(-code).name
    except (ValueError, TypeError):
        return f"exit status {code}"


def run_tasks(tasks, *, jobs, make_runner, runner_args, memory_mb=None, wall_limit=None, on_start=None, bind=None):
    """Run ``tasks`` (a list of (tid, payload, deps), deps the tids that must finish first) on
    ``jobs`` worker processes; returns {tid: result}, a result being what the runner returned,
    ("error", text) for an exception in it, or a Died for a worker that stopped without answering.

    ``make_runner(*runner_args)`` builds, in each worker, the callable that runs a payload.
    ``wall_limit(payload)``: seconds after which a worker on that task is stopped (None: never).
    ``bind(payload, results)`` gives the payload sent, from the results so far (its dependencies'
    included); ``on_start(tid, payload)`` is called as each task is handed out."""
    ctx = mp.get_context(start_method())
    if ctx.get_start_method() == "forkserver":
        try:
            ctx.set_forkserver_preload(["derive.prover.verify"])
        except Exception:  # noqa: BLE001 - a preload is an optimisation
            pass
    results: dict = {}
    pending = list(tasks)
    workers: list = []
    n = max(1, min(int(jobs), len(pending)))
    try:
        for _ in range(n):
            workers.append(_Worker(ctx, make_runner, runner_args, memory_mb))
        while pending or any(w.task for w in workers):
            for w in workers:  # hand out tasks, in order, to idle workers
                if w.task is not None:
                    continue
                k = next((k for k, (tid, _, deps) in enumerate(pending) if all(d in results for d in deps)), None)
                if k is None:
                    break
                tid, payload, _ = pending.pop(k)
                if bind is not None:
                    payload = bind(payload, results)
                if on_start is not None:
                    on_start(tid, payload)
                limit = wall_limit(payload) if wall_limit else None
                try:
                    w.conn.send((tid, payload))
                except (OSError, ValueError):  # the worker is gone before it got the task: a fresh one takes it
                    pending.insert(k, (tid, payload, ()))
                    _replace(workers, w, ctx, make_runner, runner_args, memory_mb)
                    continue
                if w.base is None and memory_mb:
                    w.base = resident(w.proc.pid)
                w.task = (tid, payload, time.monotonic(), limit)
            busy = [w for w in workers if w.task is not None]
            if not busy:
                if pending:  # nothing can start: a dependency can never finish (cannot happen)
                    for tid, _, _ in pending:
                        results[tid] = ("error", "unmet dependency")
                    pending.clear()
                continue
            timeout = None
            now = time.monotonic()
            for w in busy:
                if w.task[3] is not None:
                    left = w.task[2] + w.task[3] - now
                    timeout = left if timeout is None else min(timeout, left)
            if memory_mb:
                timeout = POLL_SECONDS if timeout is None else min(timeout, POLL_SECONDS)
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy],
                         timeout=None if timeout is None else max(0.0, timeout) + 0.01)
            for w in list(busy):
                if w.conn in ready:
                    try:
                        tid, result, recycle = w.conn.recv()
                    except (EOFError, OSError):
                        _died(results, w)
                        _replace(workers, w, ctx, make_runner, runner_args, memory_mb)
                        continue
                    results[tid] = result
                    w.task = None
                    if recycle:
                        _replace(workers, w, ctx, make_runner, runner_args, memory_mb)
                elif w.proc.sentinel in ready:
                    _died(results, w)
                    _replace(workers, w, ctx, make_runner, runner_args, memory_mb)
                elif memory_mb and w.base is not None and (resident(w.proc.pid) or 0) > w.base + memory_mb * (1 << 20):
                    tid = w.task[0]
                    results[tid] = Died("memory", f"the check used more than the worker's memory cap of {memory_mb} MiB; "
                                                  "the worker was stopped (and replaced)",
                                   time.monotonic() - w.task[2])
                    w.task = None
                    w.stop(kill=True)
                    _replace(workers, w, ctx, make_runner, runner_args, memory_mb)
                elif w.task[3] is not None and time.monotonic() - w.task[2] > w.task[3]:
                    tid = w.task[0]
                    results[tid] = Died("time", f"the worker gave no answer within the wall-clock backstop of "
                                                f"{w.task[3]:.0f} s and was stopped", time.monotonic() - w.task[2])
                    w.task = None
                    w.stop(kill=True)
                    _replace(workers, w, ctx, make_runner, runner_args, memory_mb)
    finally:
        for w in workers:
            w.stop(kill=w.task is not None)
        deadline = time.monotonic() + 2.0
        for w in workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.kill()
                w.proc.join(1.0)
    return results


def _died(results, w):
    if w.task is None:
        return
    w.proc.join(1.0)
    code = w.proc.exitcode
    how = f"the worker process died ({_signal_name(code)})" if code is not None and code < 0 else \
        f"the worker process stopped ({'exit status ' + str(code) if code is not None else 'no exit status'})"
    results[w.task[0]] = Died("memory", how + " while checking this: out of memory under its cap, most likely",
                              time.monotonic() - w.task[2])
    w.task = None


def _replace(workers, w, ctx, make_runner, runner_args, memory_mb):
    w.stop(kill=True)
    w.proc.join(1.0)
    k = workers.index(w)
    workers[k] = _Worker(ctx, make_runner, runner_args, memory_mb)


__all__ = ["run_tasks", "usable_cores", "default_memory_mb", "cap_memory", "start_method", "Died"]
