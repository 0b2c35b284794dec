"""Where `coca data prepare` runs its tasks: this machine's processes, or a Ray cluster.

Every task writes its output under a temporary name and renames it when complete, so running a
task twice is harmless. That makes a dead worker (killed by the kernel for memory, a lost node)
cheap to handle: its unfinished tasks are run again, up to ``MAX_TASK_ATTEMPTS`` times in all,
then the job stops with a clear error and a rerun of the same command resumes it.
"""

from __future__ import annotations

import os
import socket

from ..errors import UserError

MAX_TASK_ATTEMPTS = 3


class WorkerDied(UserError):
    pass


def _call(fn, item):  # a plain function for ray.remote, which does not take partials
    return fn(item)


def parallel_map(fn, items: list, engine: str, workers: int = 0, ray_address: str = "", desc: str = "") -> list:
    """``[fn(x) for x in items]``, run on local processes (engine local) or Ray (engine ray)."""
    from ..progress import progress_bar
    if not items:
        return []
    with progress_bar(len(items), desc=desc, unit="task", leave=False) as bar:
        if engine == "ray":
            return _ray_map(fn, items, workers, ray_address, desc, bar)
        workers = min(workers or os.cpu_count() or 1, len(items))
        if workers == 1:  # in this process: a crash here is a crash of the job, which a rerun resumes
            results = []
            for x in items:
                results.append(fn(x))
                bar.update(1)
            return results
        return _process_map(fn, items, workers, desc, bar)


def _process_map(fn, items, workers, desc, bar) -> list:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    from concurrent.futures.process import BrokenProcessPool
    results: dict[int, object] = {}
    for attempt in range(1, MAX_TASK_ATTEMPTS + 1):
        # a worker that dies breaks the whole pool (unlike multiprocessing.Pool, which would wait
        # for its task forever); the tasks without a result run again in a new pool
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(fn, items[i]): i for i in range(len(items)) if i not in results}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update(1)
                return [results[i] for i in range(len(items))]
            except BrokenProcessPool as e:
                broken = e
                for future, i in futures.items():  # results that arrived before the break
                    if i not in results and future.done() and not future.exception():
                        results[i] = future.result()
                        bar.update(1)
    raise WorkerDied(f"{desc}: a worker process died {MAX_TASK_ATTEMPTS} times (killed by a signal, or out of "
                     f"memory: {broken}) with {len(items) - len(results)} of {len(items)} tasks unfinished; the finished "
                     "ones are kept: rerun the same command to resume")


def connect_ray(workers: int, address: str) -> None:
    """Start a local Ray instance, or join the cluster at ``address`` ("auto" or host:port)."""
    import ray
    if ray.is_initialized():
        return
    if not address:
        ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False, log_to_driver=False)
        return
    if address != "auto":  # fail in seconds, not after Ray's own minute of retries
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=5).close()
        except (OSError, ValueError) as e:
            raise UserError(f"cannot reach the Ray cluster at ray_address={address!r} ({e}); give the head node's "
                            "host:port (the GCS port, 6379 by default) or 'auto' on a cluster node") from None
    try:
        ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot connect to the Ray cluster at ray_address={address!r}: {e}") from None


def _ray_map(fn, items, workers, address, desc, bar) -> list:
    import ray
    from ray.exceptions import WorkerCrashedError
    connect_ray(workers, address)
    # Ray reruns a task whose worker process or node died (max_retries); the task's own errors
    # are not retried and come back as they are
    remote = ray.remote(max_retries=MAX_TASK_ATTEMPTS - 1)(_call)
    pending = [remote.remote(fn, x) for x in items]
    order = {ref: i for i, ref in enumerate(pending)}
    results = [None] * len(items)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        try:
            results[order[done[0]]] = ray.get(done[0])
        except WorkerCrashedError:
            raise WorkerDied(f"{desc}: task {order[done[0]]} lost its worker {MAX_TASK_ATTEMPTS} times (killed by "
                             "a signal, out of memory, or a lost node); finished tasks are kept: rerun the same "
                             "command to resume") from None
        bar.update(1)
    return results
