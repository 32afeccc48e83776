"""The Ray engine of ``tools/infer.py --ray_address ADDRESS``: where each planned case runs, nothing else.

:mod:`networks.batch.volumes` plans the batch (cases, output paths, skip-if-complete) and processes one case
(:func:`~networks.batch.volumes.process_case`: segment, write atomically, build the Result); the batch's
:class:`~networks.batch.core.BatchSummary` records the rows. This module only sends each case to a Ray cluster as one
task and hands each Result back to the recorder as it arrives.

Why tasks (and not actors or Ray Data): a task whose worker process is killed or whose node leaves the cluster is
rerun elsewhere by Ray itself (``max_retries``), with no bookkeeping here; a case that fails on its own (corrupt file,
NaN volume) never raises out of the task, it returns a failed Result, so it is reported once and never retried.
Ray keeps its worker processes and reuses them for the next task, and each process keeps the bundle's network it
loaded (:func:`_runner`), so a worker loads the network once and then segments case after case.

This module imports Ray: :mod:`networks.batch.runners` imports it only when ``--ray_address`` is given.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket

import ray

from networks.batch.core import Result, UsageError, failed_result
from networks.batch.volumes import Case, VolumeSegmenter, process_case

MAX_RETRIES = 3  # reruns of a case whose worker process or node died; a case that fails by itself is not rerun
PROBE_TIMEOUT_S = 8  # per step of the reachability check (TCP, then one gRPC call): a wrong address fails within 30 s
ADDRESS = re.compile(r"(?P<client>ray://)?(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d{1,5})")
ADDRESS_FORMS = "local, auto, HOST:PORT (a cluster started with `ray start --head`) or ray://HOST:10001 (Ray Client)"
_RUNNERS: dict[str, VolumeSegmenter] = {}  # in each worker process: the bundle it has loaded, by settings


def _runner(settings: dict) -> VolumeSegmenter:
    """The bundle this worker process loaded for ``settings``, loaded on its first case."""
    key = json.dumps(settings, sort_keys=True)
    if key not in _RUNNERS:
        import torch

        if settings["num_threads"] > 0:
            torch.set_num_threads(settings["num_threads"])
        _RUNNERS.clear()  # a worker serves one batch's bundle at a time
        _RUNNERS[key] = VolumeSegmenter(settings["bundle_dir"], settings["device"], engine=settings["engine"],
                                     overrides=settings["overrides"])
    return _RUNNERS[key]


def segment_case(settings: dict, case: Case) -> Result:
    """One Ray task: one case, processed exactly as in-process. Its process is titled ``ray::segment_case``."""
    try:
        runner = _runner(settings)
    except Exception as e:  # the bundle is not visible or not loadable on this node: report, do not retry
        return failed_result(case, RuntimeError(f"{socket.gethostname()} could not load the bundle: {e}"))
    return process_case(runner, case)


def process_all(cases: list[Case], settings: dict, record) -> None:
    """Run every case as a task on the connected cluster; ``record(result)`` as each one finishes, in any order."""
    options = {
        "max_retries": MAX_RETRIES,
        "retry_exceptions": False,
        "num_cpus": max(settings["num_threads"], 1),
        "num_gpus": 1 if str(settings["device"]).startswith("cuda") else 0,
    }
    task = ray.remote(segment_case).options(**options)
    pending = {task.remote(settings, case): case for case in cases}
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, fetch_local=False)
        case = pending.pop(done[0])
        try:
            result = ray.get(done[0])
        except ray.exceptions.RayError as e:  # e.g. its worker died on every one of 1 + MAX_RETRIES attempts
            first_line = (str(e).strip().splitlines() or [""])[0]
            result = failed_result(case, RuntimeError(f"Ray could not run this case: {type(e).__name__}: {first_line}"))
        record(result)


def check_address(address: str) -> str:
    """``address`` if it is one of the forms Ray accepts here; UsageError otherwise."""
    address = str(address)  # fire turns a bare number into an int
    match = ADDRESS.fullmatch(address)
    if address in ("local", "auto") or (match and 0 < int(match["port"]) < 65536):
        return address
    raise UsageError(f"--ray_address {address!r} is not a Ray address; use {ADDRESS_FORMS}.")


def _check_reachable(address: str) -> None:
    """Fail fast (UsageError) unless a Ray cluster answers at ``address``: its GCS for HOST:PORT, its Ray Client
    server for ray://. ray.init alone waits minutes on a wrong address; each step here gives up after a few seconds."""
    import grpc
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc, ray_client_pb2, ray_client_pb2_grpc

    match = ADDRESS.fullmatch(address)
    host, port, client = match["host"], int(match["port"]), bool(match["client"])
    try:
        socket.create_connection((host.strip("[]"), port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as e:
        raise UsageError(f"cannot reach a Ray cluster at {address} ({e.strerror or e}); start one with "
                         f"`ray start --head --port={port}` or use --ray_address local.") from e
    with grpc.insecure_channel(f"{host}:{port}") as channel:
        if client:
            call = ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo
            request = ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING)
        else:
            call = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId
            request = gcs_service_pb2.GetClusterIdRequest()
        try:
            call(request, timeout=PROBE_TIMEOUT_S)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.UNAUTHENTICATED:  # a Ray cluster with token authentication
                if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
                    raise UsageError(f"the Ray cluster at {address} requires token authentication: export "
                                     "RAY_AUTH_MODE=token, with its token in ~/.ray/auth_token or RAY_AUTH_TOKEN.") from e
                return  # ray.init sends the token
            expected = ("a Ray Client server (`ray start --head --ray-client-server-port`)" if client else
                        "a Ray cluster (the --port of `ray start --head`; Ray Client ports take ray://)")
            raise UsageError(f"{address} answers, but not as {expected}: {e.code().name}.") from e


@contextlib.contextmanager
def connect(address: str):
    """Connected to the Ray cluster at ``address`` (``local`` starts one on this machine) while in the block,
    disconnected after. This repository's ``networks`` package travels with the job (``py_modules``): each node needs
    the Python environment only, and BUNDLE_DIR, INPUT and OUTPUT_DIR at the same paths."""
    address = check_address(address)
    if ray.is_initialized():
        raise UsageError("this process is already connected to Ray; --ray_address makes its own connection.")
    if address == "auto":
        with contextlib.suppress(Exception):  # Ray's own lookup of the cluster `ray start` started on this machine
            from ray._private.services import canonicalize_bootstrap_address

            address = canonicalize_bootstrap_address("auto") or "auto"
    if address not in ("local", "auto"):
        _check_reachable(address)
    networks_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    options = {"runtime_env": {"py_modules": [networks_dir]},
               "log_to_driver": False}
    if address == "local":
        options["include_dashboard"] = False
    try:
        ray.init(address=address, **options)
    except Exception as e:
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UsageError(f"cannot connect to the Ray cluster at {address}: {first_line}") from e
    try:
        yield
    finally:
        ray.shutdown()
