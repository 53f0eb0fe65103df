"""The Docker runtime: each worker is a container of the endpoint's image (aiodocker).

- Network: the node's workers share one bridge network, `runplane-<node>`. The agent also
  listens on that bridge's gateway address and gives workers their URLs there; the guard
  (netguard.py) lets containers reach nothing else on this host and no NATS server.
- A container gets the RunPod worker env (no host env, no RP_* setting), the endpoint's
  `command` as CMD, the node's limits (RP_WORKER_MEMORY_MB, RP_WORKER_CPUS), its GPUs as
  device requests, `no-new-privileges`, an init process (signals, zombies), and labels
  runplane.worker_id / endpoint_id / node_id / gpu_uuids.
- Containers outlive a killed agent; the next agent on the node adopts the running ones
  (found by label; their token is in their env) and removes the others.
- An exited container is inspected (exit code, OOM kill), its last output read, then removed.
- Flash boot: pause/unpause (cgroup freezer); snapshots are `docker commit`s of an initialised
  worker, `runplane-snapshot:<node>-<endpoint and spec>`, labelled with node, endpoint and
  spec digest; later cold starts of that endpoint on this node start from them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import math
import secrets
import shutil
import time
from collections.abc import Callable
from typing import Any

import aiodocker
import aiohttp
import structlog
from aiodocker.containers import DockerContainer
from aiodocker.exceptions import DockerError

from runplane_node_agent.runtimes.base import (
    Adopted,
    Capability,
    Launch,
    OutputSink,
    RunningWorker,
    Runtime,
    RuntimeFailure,
    Snapshot,
)
from runplane_node_agent.runtimes.netguard import Guard, GuardError
from runplane_node_agent.settings import AgentSettings

log = structlog.get_logger("runplane.node_agent.docker")

LABEL_WORKER = "runplane.worker_id"
LABEL_ENDPOINT = "runplane.endpoint_id"
LABEL_NODE = "runplane.node_id"
LABEL_GPUS = "runplane.gpu_uuids"
LABEL_SPEC = "runplane.spec_digest"
LABEL_SNAPSHOT_OF = "runplane.snapshot_of"
SNAPSHOT_REPOSITORY = "runplane-snapshot"

_LINE_LIMIT_CHARS = 1024 * 1024
# Calls that should answer at once; logs, waits and pulls have no total limit.
_API_TIMEOUT = aiohttp.ClientTimeout(total=120, connect=10)
_ENGINE_ERRORS = (DockerError, aiohttp.ClientError, OSError, asyncio.TimeoutError)


def node_hash(node_id: str) -> str:
    """Short, stable, safe in interface and chain names."""
    return hashlib.sha1(node_id.encode()).hexdigest()[:11]


class DockerWorker(RunningWorker):
    def __init__(self, worker_id: str, container: DockerContainer, output: OutputSink, *,
                 logs_since: int = 0) -> None:
        self.worker_id = worker_id
        self.container = container
        self.container_id = container.id
        self._exited: asyncio.Future[int] | None = None
        self._pumps = [asyncio.ensure_future(_pump(container, stream, output, logs_since))
                       for stream in ("stdout", "stderr")]
        self._kills: set[asyncio.Task] = set()

    async def wait(self) -> int:
        if self._exited is None:
            self._exited = asyncio.ensure_future(self._reap())
        return await asyncio.shield(self._exited)

    async def _reap(self) -> int:
        """Wait for the container to stop, note why, read its last output, remove it."""
        code = await self._wait_for_exit()
        with contextlib.suppress(*_ENGINE_ERRORS):
            state = (await self.container.show())["State"]
            code = int(state.get("ExitCode", code))
            if state.get("OOMKilled"):
                self.exit_detail = "out of memory: killed at the container's memory limit"
            elif state.get("Error"):
                self.exit_detail = str(state["Error"])
        await asyncio.wait(self._pumps, timeout=2)
        for pump in self._pumps:
            pump.cancel()
        with contextlib.suppress(*_ENGINE_ERRORS):
            await self.container.delete(force=True)
        return code

    async def _wait_for_exit(self) -> int:
        delay_s = 0.5
        while True:
            try:
                return int((await self.container.wait())["StatusCode"])
            except DockerError as exc:
                if exc.status == 404:  # removed behind our back
                    return -1
                error = exc.message
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
                error = repr(exc)
            log.warning("waiting for a container failed; retrying", worker_id=self.worker_id,
                        container=self.container_id[:12], error=error)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 10.0)

    async def stop(self, grace_s: float) -> int:
        if self._exited is None or not self._exited.done():
            with contextlib.suppress(*_ENGINE_ERRORS):
                # SIGTERM to the init process, which passes it on; SIGKILL after the grace.
                await self.container.stop(t=max(0, math.ceil(grace_s)))
        return await self.wait()

    def kill(self) -> None:
        async def kill() -> None:
            with contextlib.suppress(*_ENGINE_ERRORS):
                await self.container.kill()

        task = asyncio.ensure_future(kill())
        self._kills.add(task)
        task.add_done_callback(self._kills.discard)


async def _pump(container: DockerContainer, stream: str, output: OutputSink, since: int) -> None:
    """One of the container's streams into `output`, line by line, until it ends."""
    params: dict[str, Any] = {stream: True, "follow": True}
    if since:
        params["since"] = since
    pending = ""
    try:
        async for chunk in container.log(**params):
            pending += chunk
            *lines, pending = pending.split("\n")
            for line in lines:
                output(stream, line.rstrip("\r"))
            if len(pending) > _LINE_LIMIT_CHARS:
                output(stream, pending)
                pending = ""
    except asyncio.CancelledError:
        raise
    except Exception:  # the engine went away or the container is gone: nothing more to read
        pass
    if pending:
        output(stream, pending.rstrip("\r"))


class DockerRuntime(Runtime):
    name = "docker"
    inherits_host_env = False

    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.node_id = settings.node_id
        self.network = f"runplane-{settings.node_id}"
        self.capabilities = frozenset()
        self.docker: aiodocker.Docker | None = None
        self.guard: Guard | None = None
        # Why checkpoint/restore is not offered here (None: it is).
        self.checkpoint_unavailable: str | None = None

    # -- setup ------------------------------------------------------------------------------

    async def open(self) -> None:
        try:
            self.docker = aiodocker.Docker(timeout=_API_TIMEOUT)
            info = await self.docker.system.info()
        except Exception as exc:
            raise RuntimeFailure(f"no Docker engine answers: {exc!r}") from exc
        capabilities = {Capability.PAUSE, Capability.SNAPSHOT}
        if "nvidia" in (info.get("Runtimes") or {}) or shutil.which("nvidia-container-runtime-hook"):
            capabilities.add(Capability.GPU)
        self.checkpoint_unavailable = await _checkpoint_unavailable(info)
        if self.checkpoint_unavailable is None:
            capabilities.add(Capability.CHECKPOINT)
        else:
            log.info("checkpoint/restore unavailable", reason=self.checkpoint_unavailable)
        self.capabilities = frozenset(capabilities)
        gateway, bridge = await self._ensure_network()
        self.worker_host = gateway
        self.guard = Guard(bridge=bridge, chain=f"RP-{node_hash(self.node_id)}", gateway=gateway,
                           agent_port=self.settings.port, nats_urls=tuple(self.settings.nats_url.split(",")))
        try:
            await self.guard.install()
        except GuardError as exc:
            log.error("cannot fence worker containers off this host and NATS: they can reach every port "
                      "this host listens on", error=str(exc))
        log.info("docker runtime ready", engine=info.get("ServerVersion"), network=self.network,
                 gateway=gateway, capabilities=sorted(c.value for c in self.capabilities))

    async def _ensure_network(self) -> tuple[str, str]:
        """The node's bridge network (created once, kept while containers use it):
        (gateway address, bridge interface)."""
        assert self.docker is not None
        bridge = f"rp-{node_hash(self.node_id)}"
        for _ in range(3):
            try:
                info = await (await self.docker.networks.get(self.network)).show()
                break
            except DockerError as exc:
                if exc.status != 404:
                    raise RuntimeFailure(f"cannot inspect network {self.network}: {exc.message}") from exc
            try:
                await self.docker.networks.create({
                    "Name": self.network, "Driver": "bridge", "CheckDuplicate": True,
                    "Labels": {LABEL_NODE: self.node_id},
                    "Options": {"com.docker.network.bridge.name": bridge},
                })
            except DockerError as exc:
                if exc.status != 409:  # 409: created meanwhile
                    raise RuntimeFailure(f"cannot create network {self.network}: {exc.message}") from exc
        else:
            raise RuntimeFailure(f"network {self.network} vanished while being set up")
        gateways = [c["Gateway"] for c in (info.get("IPAM") or {}).get("Config") or [] if c.get("Gateway")]
        if not gateways:
            raise RuntimeFailure(f"network {self.network} has no gateway address")
        bridge = (info.get("Options") or {}).get("com.docker.network.bridge.name") or f"br-{info['Id'][:12]}"
        return gateways[0], bridge

    # -- workers ----------------------------------------------------------------------------

    def _config(self, launch: Launch) -> dict[str, Any]:
        host: dict[str, Any] = {
            "NetworkMode": self.network,
            "SecurityOpt": ["no-new-privileges"],
            "Init": True,
            "RestartPolicy": {"Name": "no"},
            "LogConfig": {"Type": "json-file", "Config": {"max-size": "10m", "max-file": "2"}},
        }
        if self.settings.worker_memory_mb:
            host["Memory"] = host["MemorySwap"] = self.settings.worker_memory_mb * 1024 * 1024
        if self.settings.worker_cpus:
            host["NanoCpus"] = int(self.settings.worker_cpus * 1e9)
        if launch.gpu_uuids:
            host["DeviceRequests"] = [{"Driver": "nvidia", "DeviceIDs": list(launch.gpu_uuids),
                                       "Capabilities": [["gpu"]]}]
        config: dict[str, Any] = {
            "Image": launch.image,
            "Env": [f"{k}={v}" for k, v in launch.env.items()],
            "Labels": {**launch.labels, LABEL_WORKER: launch.worker_id, LABEL_ENDPOINT: launch.endpoint_id,
                       LABEL_NODE: self.node_id, LABEL_GPUS: ",".join(launch.gpu_uuids)},
            "HostConfig": host,
        }
        if launch.argv:
            config["Cmd"] = list(launch.argv)
        return config

    async def start(self, launch: Launch, output: OutputSink) -> RunningWorker:
        if self.docker is None:
            raise RuntimeFailure("the docker runtime is not open")
        if not launch.image:
            raise RuntimeFailure("the endpoint has no imageName (the docker runtime runs images)")
        if launch.gpu_uuids and Capability.GPU not in self.capabilities:
            raise RuntimeFailure("this node's Docker engine cannot hand out GPUs "
                                 "(no NVIDIA container runtime)")
        config = self._config(launch)
        name = f"rp-{launch.worker_id}-{secrets.token_hex(3)}"
        container: DockerContainer | None = None
        try:
            container = await self._create(config, name, launch.image)
            await container.start()
        except (DockerError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            if container is not None:
                with contextlib.suppress(*_ENGINE_ERRORS):
                    await container.delete(force=True)
            message = exc.message if isinstance(exc, DockerError) else repr(exc)
            raise RuntimeFailure(f"cannot start a container of {launch.image}: {message}") from exc
        log.info("container started", worker_id=launch.worker_id, container=container.id[:12],
                 image=launch.image)
        return DockerWorker(launch.worker_id, container, output)

    async def _create(self, config: dict[str, Any], name: str, image: str) -> DockerContainer:
        assert self.docker is not None
        try:
            return await self.docker.containers.create(config, name=name)
        except DockerError as exc:
            if exc.status != 404:
                raise
        # The image is not here: pull it, then try once more.
        reference = image if "@" in image or ":" in image.rsplit("/", 1)[-1] else f"{image}:latest"
        log.info("pulling image", image=reference)
        await self.docker.images.pull(reference)
        return await self.docker.containers.create(config, name=name)

    async def pause(self, worker: RunningWorker) -> None:
        """docker pause: the cgroup freezer stops every process of the container."""
        assert isinstance(worker, DockerWorker)
        try:
            await worker.container.pause()
        except _ENGINE_ERRORS as exc:
            raise RuntimeFailure(f"cannot pause container {worker.container_id[:12]}: {exc!r}") from exc

    async def resume(self, worker: RunningWorker) -> None:
        assert isinstance(worker, DockerWorker)
        try:
            await worker.container.unpause()
        except _ENGINE_ERRORS as exc:
            raise RuntimeFailure(f"cannot unpause container {worker.container_id[:12]}: {exc!r}") from exc

    async def memory_mb(self, worker: RunningWorker) -> int | None:
        """The container's memory use as `docker stats` shows it (page cache not counted)."""
        assert isinstance(worker, DockerWorker) and self.docker is not None
        try:
            stats = await self.docker._query_json(f"containers/{worker.container_id}/stats",
                                                  params={"stream": "0", "one-shot": "1"})
        except _ENGINE_ERRORS as exc:
            log.warning("cannot read a container's memory", worker_id=worker.worker_id, error=repr(exc))
            return None
        memory = stats.get("memory_stats") or {}
        usage = memory.get("usage")
        if usage is None:
            return None
        detail = memory.get("stats") or {}
        cache = detail.get("total_inactive_file", detail.get("inactive_file", 0))  # cgroup v1 / v2
        return round(max(0, usage - cache) / (1024 * 1024))

    # -- snapshots --------------------------------------------------------------------------

    def snapshot_ref(self, snapshot: Snapshot) -> str:
        """runplane-snapshot:<node>-<endpoint and spec>: lowercase and short, as tags must be."""
        key = hashlib.sha1(f"{snapshot.endpoint_id}/{snapshot.spec_digest}".encode()).hexdigest()[:16]
        return f"{SNAPSHOT_REPOSITORY}:{node_hash(self.node_id)}-{key}"

    async def snapshot(self, worker: RunningWorker, snapshot: Snapshot) -> None:
        """docker commit of the worker's container (not paused by the commit: the worker is idle,
        its initialisation done, and flash boot may be pausing and resuming it meanwhile).
        Older snapshots of the endpoint on this node are removed."""
        assert isinstance(worker, DockerWorker) and self.docker is not None
        ref = self.snapshot_ref(snapshot)
        repository, tag = ref.split(":")
        labels = {LABEL_NODE: self.node_id, LABEL_ENDPOINT: snapshot.endpoint_id,
                  LABEL_SPEC: snapshot.spec_digest, LABEL_SNAPSHOT_OF: snapshot.base_image}
        changes = ["ENV RUNPOD_AI_API_KEY=", *(f"LABEL {k}={v}" for k, v in labels.items())]
        try:
            await worker.container.commit(repository=repository, tag=tag, pause=False, changes=changes,
                                          message=f"runplane snapshot of worker {worker.worker_id}")
        except _ENGINE_ERRORS as exc:
            raise RuntimeFailure(f"cannot commit container {worker.container_id[:12]}: {exc!r}") from exc
        mine = {"label": [f"{LABEL_NODE}={self.node_id}", f"{LABEL_ENDPOINT}={snapshot.endpoint_id}"],
                "reference": [SNAPSHOT_REPOSITORY]}
        with contextlib.suppress(*_ENGINE_ERRORS):
            for image in await self.docker.images.list(filters=mine):
                if (image.get("Labels") or {}).get(LABEL_SPEC) != snapshot.spec_digest:
                    with contextlib.suppress(*_ENGINE_ERRORS):  # in use: left for a later commit
                        await self.docker.images.delete(image["Id"], force=False)

    async def _snapshot_images(self, endpoint_id: str | None = None) -> list[dict]:
        assert self.docker is not None
        labels = [f"{LABEL_NODE}={self.node_id}"]
        if endpoint_id is not None:
            labels.append(f"{LABEL_ENDPOINT}={endpoint_id}")
        try:
            return await self.docker.images.list(
                filters={"label": labels, "reference": [SNAPSHOT_REPOSITORY]})
        except _ENGINE_ERRORS as exc:
            raise RuntimeFailure(f"cannot list snapshot images: {exc!r}") from exc

    async def snapshot_endpoints(self) -> set[str]:
        images = await self._snapshot_images()
        return {(image.get("Labels") or {}).get(LABEL_ENDPOINT, "") for image in images} - {""}

    async def remove_snapshots(self, endpoint_id: str) -> int:
        assert self.docker is not None
        removed = 0
        for image in await self._snapshot_images(endpoint_id):
            with contextlib.suppress(*_ENGINE_ERRORS):  # in use by a container: a later round
                await self.docker.images.delete(image["Id"], force=False)
                removed += 1
        return removed

    async def find_snapshot(self, snapshot: Snapshot) -> str | None:
        assert self.docker is not None
        ref = self.snapshot_ref(snapshot)
        try:
            info = await self.docker.images.inspect(ref)
        except _ENGINE_ERRORS:
            return None
        labels = (info.get("Config") or {}).get("Labels") or {}
        return ref if labels.get(LABEL_SPEC) == snapshot.spec_digest else None

    # -- a restarted agent ------------------------------------------------------------------

    async def _containers(self) -> list[DockerContainer]:
        assert self.docker is not None
        mine = json.dumps({"label": [f"{LABEL_NODE}={self.node_id}"]})
        return await self.docker.containers.list(all=True, filters=mine)

    async def adopt(self, agent_url: str, output: Callable[[str, str], OutputSink]) -> list[Adopted]:
        assert self.docker is not None
        shown = []
        for container in await self._containers():
            with contextlib.suppress(DockerError):
                shown.append((container, await container.show()))
        shown.sort(key=lambda c: c[1].get("Created", ""), reverse=True)  # the newest first
        adopted: dict[str, Adopted] = {}
        since = int(time.time())
        for container, info in shown:
            labels = info["Config"].get("Labels") or {}
            env = dict(e.split("=", 1) for e in info["Config"].get("Env") or [] if "=" in e)
            worker_id, endpoint_id = labels.get(LABEL_WORKER, ""), labels.get(LABEL_ENDPOINT, "")
            state = info.get("State") or {}
            if not state.get("Running"):
                why = "it is not running"
            elif not worker_id or not endpoint_id or not env.get("RUNPOD_AI_API_KEY"):
                why = "it lacks the runplane labels or its token"
            elif not env.get("RUNPOD_WEBHOOK_PING", "").startswith(agent_url + "/"):
                why = f"it reaches the agent at another URL than {agent_url}"
            elif worker_id in adopted:
                why = "a newer container has the same worker id"
            else:
                why = ""
            if why:
                log.info("removing a container left by an earlier agent", container=container.id[:12],
                         worker_id=worker_id, why=why)
                with contextlib.suppress(*_ENGINE_ERRORS):
                    await container.delete(force=True)
                continue
            if state.get("Paused"):
                await container.unpause()
            gpus = tuple(u for u in labels.get(LABEL_GPUS, "").split(",") if u)
            handle = DockerWorker(worker_id, container, output(worker_id, endpoint_id), logs_since=since)
            adopted[worker_id] = Adopted(worker_id=worker_id, endpoint_id=endpoint_id, gpu_uuids=gpus,
                                         token=env["RUNPOD_AI_API_KEY"], handle=handle)
            log.info("adopted a running container", container=container.id[:12], worker_id=worker_id,
                     endpoint_id=endpoint_id)
        return list(adopted.values())

    async def close(self) -> None:
        """Leave the network and the guard to the containers still running (a later agent adopts
        them); with none left, remove both."""
        if self.docker is None:
            return
        try:
            if not await self._containers():
                if self.guard is not None:
                    await self.guard.remove()
                with contextlib.suppress(DockerError):
                    await (await self.docker.networks.get(self.network)).delete()
        except (GuardError, *_ENGINE_ERRORS) as exc:
            log.warning("cleaning up the docker runtime failed", error=repr(exc))
        finally:
            await self.docker.close()
            self.docker = None


async def _checkpoint_unavailable(info: Any) -> str | None:
    """Why `docker checkpoint` cannot be used here, or None when it can: the engine must run
    with experimental features, CRIU must be installed, and `criu check` must pass."""
    reasons = []
    if not info.get("ExperimentalBuild"):
        reasons.append("the Docker engine does not run with experimental features")
    if shutil.which("criu") is None:
        reasons.append("criu is not installed")
    else:
        try:
            proc = await asyncio.create_subprocess_exec(
                "criu", "check", stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT)
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), 10)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()
                raise
            if proc.returncode != 0:
                lines = out.decode(errors="replace").strip().splitlines()
                reasons.append(f"criu check failed on this kernel: {lines[-1] if lines else proc.returncode}")
        except (OSError, asyncio.TimeoutError) as exc:
            reasons.append(f"criu check could not run: {exc!r}")
    return "; ".join(reasons) or None
