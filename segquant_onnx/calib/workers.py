"""Calibration over workers: the feeds cut into runs of consecutive feeds (tasks), each run through its own
ONNX Runtime session in a worker process, the runs' statistics merged in feed order.

    feeds 0..F-1 -> tasks [0, c), [c, 2c), ... -> workers (a session each) -> Shard per task -> merged in order

The merge is exact (observers: `update` equals merging a batch's own statistics, and merging is
associative), so the result is bit for bit the single-process one for any number of workers or task size.

Local workers are `multiprocessing` processes with a *spawn* context (the standard library, no new
dependency; spawn because ONNX Runtime's thread pools do not survive a fork), one pipe each. Not
`concurrent.futures.ProcessPoolExecutor`: after a worker died (os._exit in a test) its broken pool left the
other worker blocked writing its result, and the shutdown hung (Python 3.11, seen here); with a pipe per
worker, a dead worker is a closed pipe, its one task is known and retried, and the worker number picks its
GPU. Ray's local mode would add an 80 MB dependency and ~8 s of start-up on this machine for the same
thing, so Ray is used for what it is for, a cluster (`--ray-address`): tasks there ask for one GPU each when
a GPU provider is given, and Ray pins each to its own device.

A task that fails (an exception, or its worker process gone) is run once more; a second failure stops the
run with one sentence (WorkerError). A UserError raised in a worker (a model ONNX Runtime refuses) is the
user's to fix and is raised as it is, without a retry. Feeds are read by this process (any source works,
Python iterables too) and at most two tasks per worker are in flight, so memory stays bounded.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import threading
import uuid
from dataclasses import dataclass
from concurrent.futures import FIRST_COMPLETED, Future, wait
from itertools import islice

from segquant_onnx.calib.calibrate import Shard, run_feeds
from segquant_onnx.errors import UserError
from segquant_onnx.ir.runtime import GPU_PROVIDERS, SessionSource, gpu_count, provider_options

log = logging.getLogger(__name__)

DEFAULT_TASK_FEEDS = 8  # feeds per task when the data's length is unknown (a Python iterable)
# test hook, read in the worker: "exit:T:A" / "raise:T:A" makes task T's first A attempts call os._exit(3)
# or raise (tests/calib/test_workers.py), "...:T:A:FN" only tasks running the function FN; unset in normal runs
FAULT_ENV = "SEGQUANT_TEST_WORKER_FAULT"


class WorkerError(RuntimeError):
    """A calibration task failed twice (its worker raised or died); the CLI prints it in one line."""


_WORKER: dict = {}  # in a Ray worker process: its session (opened once per run) and that run's key


def _fault(task: int, attempt: int, fn) -> None:
    kind, t, attempts, *only = (os.environ.get(FAULT_ENV) or "none:-1:0").split(":")
    if int(t) == task and attempt < int(attempts) and (not only or only[0] == fn.__name__):
        if kind == "exit":
            os._exit(3)
        raise RuntimeError(f"injected fault in task {task}")


def _session_for(cache: dict, key: str, source: SessionSource | None, open_source) -> object:
    """The worker's session of the model `key` names: the one it holds, or (the previous one dropped first, to
    hold one model at a time) `open_source(source)`."""
    if cache.get("key") != key:
        cache.pop("session", None)
        cache["session"], cache["key"] = open_source(source), key
    return cache["session"]


def _local_worker(conn, providers: tuple[str, ...], options, threads: int) -> None:
    """A local worker process: runs tasks until told to stop. A task is `fn(session, *args)` on the session of
    the model its key names, opened at the first task with that key (the pool sends the model only then)."""
    cache: dict = {}
    while (message := conn.recv()) is not None:
        task, attempt, key, source, fn, args = message
        # the previous task's session, if its model is not this task's, goes before the next opens: held here it
        # stayed alive through the opening (measured on the 2 GiB float16 DiT, --workers 2: 4.9 GB per worker, two
        # models at once)
        session = None
        try:
            session = _session_for(cache, key, source, lambda src: src.open(providers, options, threads=threads))
            _fault(task, attempt, fn)
            conn.send(("ok", fn(session, *args)))
        except UserError as exc:
            conn.send(("user", str(exc)))
        except Exception as exc:  # noqa: BLE001 - sent to the parent, which retries the task once
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _run_ray_task(source: SessionSource, key: str, providers: tuple[str, ...], task: int, attempt: int, fn,
                  args: tuple):
    # Ray reuses worker processes: open the session once per process and model and run; Ray sets
    # CUDA_VISIBLE_DEVICES to the task's GPU, so device 0 is that GPU
    try:
        session = _session_for(_WORKER, f"{key}/{providers}", source, lambda src: src.open(providers))
    except UserError as exc:  # returned, not raised: Ray would wrap it in its own traceback text
        return _UserFailure(str(exc))
    _fault(task, attempt, fn)
    return fn(session, *args)


@dataclass(frozen=True)
class _UserFailure:
    message: str


class _WorkerDied(RuntimeError):
    pass


class _LocalPool:
    """`workers` processes, one task each at a time; a thread per task sends it and waits for the answer, so
    a worker that dies is seen at once (its pipe closes: EOFError) and replaced by a fresh process."""

    def __init__(self, workers: int, providers: tuple[str, ...]):
        gpus = gpu_count() if any(p in GPU_PROVIDERS for p in providers) else 0
        threads = 0 if gpus else max(1, (os.cpu_count() or 1) // workers)  # CPU: split the cores, no oversubscribing
        self.workers = workers
        self._ctx, self._providers, self._gpus, self._threads = (
            multiprocessing.get_context("spawn"), providers, gpus, threads)
        self._lock, self._closed = threading.Lock(), False
        self._procs = [self._start(i) for i in range(workers)]
        self._keys: list[str | None] = [None] * workers  # the model each worker holds a session of
        self._free = list(range(workers))

    def _start(self, index: int):
        ours, theirs = self._ctx.Pipe()
        options = provider_options(self._providers, index, self._gpus)  # worker i: GPU i mod the GPU count
        proc = self._ctx.Process(target=_local_worker, daemon=True,
                                 args=(theirs, self._providers, options, self._threads))
        proc.start()
        theirs.close()  # only the child holds its end: the pipe closes when the child dies
        return proc, ours

    def submit(self, task: int, attempt: int, key: str, source: SessionSource, fn, args: tuple) -> Future:
        """Run `fn(session, *args)` on a free worker, `session` being its session of `source` (named `key`)."""
        future: Future = Future()
        with self._lock:
            index = self._free.pop()
        message = (task, attempt, key, None if self._keys[index] == key else source, fn, args)
        self._keys[index] = key
        threading.Thread(target=self._run, args=(index, message, future), daemon=True).start()
        return future

    def _run(self, index: int, args, future: Future) -> None:
        proc, conn = self._procs[index]
        try:
            with self._lock:  # never two senders on one pipe (close() sends the stop message)
                if self._closed:
                    return
                conn.send(args)
            status, value = conn.recv()
        except (EOFError, OSError):
            proc.join(timeout=30)
            with self._lock:
                if not self._closed:
                    self._procs[index] = self._start(index)
                    self._keys[index] = None
                self._free.append(index)
            future.set_exception(_WorkerDied(f"its process exited with code {proc.exitcode}"))
            return
        with self._lock:
            if status != "ok":  # its session may not have opened: the next task sends the model again
                self._keys[index] = None
            self._free.append(index)
        if status == "ok":
            future.set_result(value)
        else:
            future.set_exception(UserError(value) if status == "user" else RuntimeError(value))

    def recover(self, future: Future, exc: BaseException) -> None:
        pass  # a dead worker is replaced by the thread that saw it die

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for proc, conn in self._procs:
                try:
                    conn.send(None)
                except OSError:
                    pass
        for proc, conn in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            conn.close()


class _RayPool:
    def __init__(self, address: str, providers: tuple[str, ...], workers: int = 1):
        try:
            import ray
        except ImportError:
            raise UserError('--ray-address needs Ray, which is not installed; pip install "segquant-onnx[ray]".') \
                from None
        self.ray, self.started = ray, not ray.is_initialized()
        if self.started:
            try:
                ray.init(address=None if address == "local" else address, include_dashboard=False,
                         log_to_driver=False, configure_logging=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise UserError(f"--ray-address {address}: cannot connect to a Ray cluster there ({exc}); start one "
                                "(ray start --head) or pass 'local'.") from None
        gpus = 1 if any(p in GPU_PROVIDERS for p in providers) else 0
        if gpus and ray.cluster_resources().get("GPU", 0) < 1:  # a task asking for one would wait forever
            self.close()
            raise UserError(f"--providers {providers[0]} with --ray-address {address}: the Ray cluster has no GPU; "
                            "add GPU nodes or use CPUExecutionProvider.")
        self.remote = ray.remote(_run_ray_task).options(num_cpus=1, num_gpus=gpus, max_retries=0)
        self.workers, self.providers, self._refs = workers, providers, {}

    def submit(self, task: int, attempt: int, key: str, source: SessionSource, fn, args: tuple) -> Future:
        """Run `fn(session, *args)` in a Ray task, `session` being its worker's session of `source` (`key`)."""
        if key not in self._refs:  # the model goes to the object store once
            self._refs = {key: self.ray.put(source)}
        return self.remote.remote(self._refs[key], key, self.providers, task, attempt, fn, args).future()

    def recover(self, future: Future, exc: BaseException) -> None:
        pass  # Ray replaces a dead worker process itself

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def open_pool(workers: int, providers, ray_address: str | None):
    """Local worker processes, or Ray tasks on the cluster at `ray_address`; `close()` when done."""
    providers = tuple(providers)
    return _RayPool(ray_address, providers, workers) if ray_address else _LocalPool(workers, providers)


def run_sharded(source: SessionSource, providers, fetch: list[str], shard: Shard, indexed_feeds, *, workers: int,
                ray_address: str | None, num_feeds: int | None) -> Shard:
    """`calibrate`'s loop over `(index, feed)` pairs, on `workers` workers: merges every task's Shard into
    `shard`, in feed order."""
    providers = tuple(providers)
    per_task = DEFAULT_TASK_FEEDS if num_feeds is None else max(1, math.ceil(num_feeds / (4 * workers)))
    if num_feeds is not None:
        workers = min(workers, math.ceil(num_feeds / per_task))  # no process without a task
    log.info("calibrating on %d %s workers, %d feeds per task", workers, "Ray" if ray_address else "local", per_task)
    pool = open_pool(workers, providers, ray_address)
    key = uuid.uuid4().hex  # this run's model
    empty = shard.empty()
    tasks, done, running = {}, {}, {}  # task -> its feeds; finished shards; future -> (task, attempt)
    feeds, next_task, merged = iter(indexed_feeds), 0, 0
    try:
        while True:
            # at most 4 tasks per worker between the oldest unmerged one and the newest: a slow or retried
            # task holds back the merge, and the shards finished after it wait in memory
            while (len(running) < workers and next_task - merged < 4 * workers
                   and (chunk := list(islice(feeds, per_task)))):
                tasks[next_task] = chunk
                running[pool.submit(next_task, 0, key, source, run_feeds, (fetch, empty, chunk))] = (next_task, 0)
                next_task += 1
            if not running:
                break
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task, attempt = running.pop(future)
                try:
                    done[task] = future.result()
                    if isinstance(done[task], _UserFailure):
                        raise UserError(done[task].message)
                except UserError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure of the worker is retried once
                    pool.recover(future, exc)
                    if attempt >= 1:
                        first, last = tasks[task][0][0], tasks[task][-1][0]
                        raise WorkerError(f"calibration task {task} (feeds {first}-{last}) failed twice on its "
                                          f"worker ({_describe(exc)}); rerun with fewer --workers or without "
                                          "them.") from None
                    log.warning("calibration task %d failed (%s); running it again", task, _describe(exc))
                    running[pool.submit(task, attempt + 1, key, source, run_feeds, (fetch, empty, tasks[task]))] = (
                        task, attempt + 1)
            while merged in done:  # in feed order
                shard.merge(done.pop(merged))
                del tasks[merged]
                merged += 1
    finally:  # tasks still running finish or are killed by close(); nothing of theirs is used
        pool.close()
    return shard


def run_tasks(pool, key: str, source: SessionSource, fn, arg_list: list[tuple], what: str) -> list:
    """`fn(session, *args)` for each `args` of `arg_list` on the pool's workers (at most one task per worker at a
    time), each on its worker's session of `source` (`key` names it); the results in the order of `arg_list`. A
    task that fails is run once more; a second failure is a WorkerError naming `what`."""
    results, running, next_task = {}, {}, 0
    while next_task < len(arg_list) or running:
        while len(running) < pool.workers and next_task < len(arg_list):
            running[pool.submit(next_task, 0, key, source, fn, arg_list[next_task])] = (next_task, 0)
            next_task += 1
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            task, attempt = running.pop(future)
            try:
                value = future.result()
                if isinstance(value, _UserFailure):
                    raise UserError(value.message)
                results[task] = value
            except UserError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure of the worker is retried once
                pool.recover(future, exc)
                if attempt >= 1:
                    raise WorkerError(f"{what} task {task} failed twice on its worker ({_describe(exc)}); rerun "
                                      "with fewer --workers or without them.") from None
                log.warning("%s task %d failed (%s); running it again", what, task, _describe(exc))
                running[pool.submit(task, attempt + 1, key, source, fn, arg_list[task])] = (task, attempt + 1)
    return [results[i] for i in range(len(arg_list))]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, _WorkerDied):
        return str(exc)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
