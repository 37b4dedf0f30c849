"""Start a real Triton server with throttllem's model repository, wait for it, stop it.

Where tritonserver comes from, in order:
1. `$TRITONSERVER` (a path to the binary; its backends are in ../backends beside bin/);
2. `/opt/tritonserver/bin/tritonserver` (NGC images), backends in /opt/tritonserver/backends;
3. the CPU build inside the `nvidia-pytriton` wheel (`pip install '.[triton-cpu]'`): its Python
   backend and the stub for the running Python are assembled into a backend folder of our own,
   its libraries and the interpreter's libpython put on LD_LIBRARY_PATH (apis.md §4).
The model repository (model_repository/ of the source tree, or one given) is copied to a work
folder with its `${...}` parameters filled in; the stub runs the base interpreter and ignores
PYTHONPATH, so `python_site_packages` names this environment's site-packages.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .shm_regions import python_backend_regions, remove_orphans

logger = logging.getLogger(__name__)

ENV_TRITONSERVER = "TRITONSERVER"
NGC_TRITONSERVER = Path("/opt/tritonserver/bin/tritonserver")
MIN_GLIBC = (2, 35)
LLM_MODEL = "tensorrt_llm"
_PLACEHOLDER = re.compile(r"\$\{([A-Za-z0-9_]+)\}")


class TritonError(RuntimeError):
    """Triton is missing, broken, or did not become ready (one line saying what and where)."""


@dataclass(frozen=True)
class TritonInstall:
    binary: Path
    backend_dir: Path | None  # None: Triton's default (/opt/tritonserver/backends)
    env: dict[str, str]
    source: str  # "$TRITONSERVER", "NGC", "nvidia-pytriton"


def source_model_repository() -> Path:
    """model_repository/ of the source tree this package runs from."""
    return Path(__file__).resolve().parents[1] / "model_repository"


def _glibc_ok() -> bool:
    name, version = platform.libc_ver()
    if name != "glibc" or not version:
        return True  # cannot tell: let Triton say
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    return parts >= MIN_GLIBC


def _bundle_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _bundle_install(work_dir: Path) -> TritonInstall:
    root = _bundle_root()
    looked = "$TRITONSERVER, /opt/tritonserver/bin/tritonserver, the nvidia-pytriton wheel"
    if root is None:
        raise TritonError(
            f"tritonserver not found (looked at {looked}); install it with "
            "pip install 'throttllem[triton-cpu]' or set TRITONSERVER"
        )
    server = root / "tritonserver"
    binary = server / "bin" / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    backend = server / "backends" / "python"
    libs = root.parent / "nvidia_pytriton.libs"
    for path in (binary, stub, backend / "libtriton_python.so"):
        if not path.exists():
            raise TritonError(f"the nvidia-pytriton Triton bundle is incomplete: {path} is missing")
    if not _glibc_ok():
        raise TritonError(
            f"the nvidia-pytriton Triton bundle needs glibc >= {MIN_GLIBC[0]}.{MIN_GLIBC[1]}, "
            f"this system has {platform.libc_ver()[1]}"
        )
    backends = work_dir / "backends"
    python_dir = backends / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in (backend / "libtriton_python.so", backend / "triton_python_backend_utils.py", stub):
        dst = python_dir / src.name
        if not dst.exists():
            shutil.copy2(src, dst)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    paths = [str(libs), libdir, os.environ.get("LD_LIBRARY_PATH", "")]
    env = {"LD_LIBRARY_PATH": os.pathsep.join(p for p in paths if p)}
    return TritonInstall(binary, backends, env, "nvidia-pytriton")


def find_triton(work_dir: Path) -> TritonInstall:
    """The tritonserver to run (see the module docstring); TritonError when none works."""
    env_path = os.environ.get(ENV_TRITONSERVER)
    if env_path:
        binary = Path(env_path)
        if not (binary.is_file() and os.access(binary, os.X_OK)):
            raise TritonError(f"$TRITONSERVER={env_path} is not an executable file")
        backends = binary.resolve().parent.parent / "backends"
        return TritonInstall(binary, backends if backends.is_dir() else None, {}, "$TRITONSERVER")
    if NGC_TRITONSERVER.is_file():
        return TritonInstall(NGC_TRITONSERVER, None, {}, "NGC")
    return _bundle_install(work_dir)


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the thread that started us dies (Linux), so a
    killed launcher leaves no server behind."""
    with contextlib.suppress(Exception):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports free now. All are held bound until every one is chosen: ports
    picked one at a time, each released before the next, can repeat (the kernel may hand the
    one just released out again), and tritonserver refuses gRPC and metrics on one port."""
    with contextlib.ExitStack() as stack:
        socks = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def site_packages() -> str:
    """This environment's site-packages (for the stub, which ignores PYTHONPATH)."""
    paths = sysconfig.get_paths()
    folders = dict.fromkeys(p for p in (paths.get("purelib"), paths.get("platlib")) if p)
    return os.pathsep.join(folders)


def fill_placeholders(text: str, values: Mapping[str, str]) -> str:
    """Replace `${name}` with values[name]; unknown placeholders stay (meaning "unset")."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), text)


def _set_instance_count(text: str, count: int) -> str:
    return re.sub(r"(instance_group\s*\[\s*\{\s*count:\s*)\d+", rf"\g<1>{count}", text, count=1)


def _set_decoupled(text: str, decoupled: bool) -> str:
    value = "true" if decoupled else "false"
    return re.sub(r"(decoupled:\s*)\w+", rf"\g<1>{value}", text, count=1)


@dataclass
class RepositorySpec:
    """What to fill into the model repository."""

    parameters: dict[str, str] = field(default_factory=dict)
    instances: int = 1
    # Extra copies of the tensorrt_llm model: name -> decoupled (e.g. a non-decoupled one).
    # Their telemetry always takes free ports (a fixed base port belongs to tensorrt_llm).
    variants: dict[str, bool] = field(default_factory=dict)
    models: tuple[str, ...] = ("tensorrt_llm", "preprocessing", "postprocessing", "ensemble")
    # Instance scaling: sized copies of the tensorrt_llm model (name -> parameter overrides,
    # e.g. {"tensorrt_llm_tp2": {"twin_tp": "2"}}), and, with `routing_file`, the router in
    # place of tensorrt_llm (router.py) forwarding to the variant that file names.
    sized: dict[str, dict[str, str]] = field(default_factory=dict)
    routing_file: str | None = None


def build_repository(source: Path, dest: Path, spec: RepositorySpec) -> Path:
    """Copy the chosen models of `source` into `dest` with parameters filled in."""
    if not (source / LLM_MODEL / "config.pbtxt").is_file():
        raise TritonError(f"{source} is not a throttllem model repository (no {LLM_MODEL}/)")
    dest.mkdir(parents=True, exist_ok=True)
    values = {"python_site_packages": site_packages(), **spec.parameters}
    for name in spec.models:
        text = _copy_model(source / name, dest / name, values)
        if name == LLM_MODEL:
            text = _set_instance_count(text, spec.instances)
        (dest / name / "config.pbtxt").write_text(text)
    # Extra copies of the LLM model (other transaction policies, sized variants): renamed, and
    # their telemetry on free ports (a fixed base port belongs to tensorrt_llm).
    copies: dict[str, tuple[dict[str, str], bool | None]] = {
        name: ({}, decoupled) for name, decoupled in spec.variants.items()
    }
    copies.update({name: (overrides, None) for name, overrides in spec.sized.items()})
    for name, (overrides, decoupled) in copies.items():
        text = _copy_model(source / LLM_MODEL, dest / name, {**values, **overrides})
        text = _set_instance_count(text, spec.instances)
        text = re.sub(r'name:\s*"tensorrt_llm"', f'name: "{name}"', text, count=1)
        if decoupled is not None:
            text = _set_decoupled(text, decoupled)
        text = re.sub(r'(key: "telemetry_port" value: \{ string_value: )"[^"]*"',
                      r'\g<1>"0"', text)  # fmt: skip
        (dest / name / "config.pbtxt").write_text(text)
    if spec.routing_file is not None:
        _write_router(source, dest, values, spec.routing_file)
    return dest


def _copy_model(origin: Path, target: Path, values: dict[str, str]) -> str:
    """Copy a model folder; its config.pbtxt text with the placeholders filled (not written)."""
    shutil.copytree(origin, target, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    return fill_placeholders((origin / "config.pbtxt").read_text(), values)


# Parameters of the variants that the router takes too (router.py says what each does).
ROUTER_PARAMETERS = ("telemetry_registry_dir", "relay_stall_s", "router_threads")


def router_config(
    llm_config: str, site_packages: str, routing_file: str, extra: dict[str, str] | None = None
) -> str:
    """The router's config.pbtxt: the tensorrt_llm model's interface (inputs, outputs,
    decoupled), its engine parameters replaced by the routing file and `extra` (the router's
    own parameters, e.g. the variants' telemetry registry, where its watchdog finds their
    processes)."""
    text = re.sub(r"^parameters: .*$\n?", "", llm_config, flags=re.M)
    text = _set_instance_count(text, 1)
    pairs = {"routing_file": routing_file, "python_site_packages": site_packages, **(extra or {})}
    lines = [f'parameters: {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
             for key, value in pairs.items()]  # fmt: skip
    return text + "".join(lines)


def _write_router(source: Path, dest: Path, values: dict[str, str], routing_file: str) -> None:
    target = dest / LLM_MODEL
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(source / "router", target, ignore=shutil.ignore_patterns("__pycache__"))
    llm = (source / LLM_MODEL / "config.pbtxt").read_text()
    extra = {k: values[k] for k in ROUTER_PARAMETERS if k in values}
    text = router_config(llm, values["python_site_packages"], routing_file, extra)
    (target / "config.pbtxt").write_text(text)


@dataclass
class Ports:
    http: int
    grpc: int
    metrics: int

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> Ports:
        return cls(*free_ports(3, host))


class TritonServer:
    """One tritonserver process (and its stubs, in its own process group)."""

    def __init__(
        self,
        repository: Path,
        *,
        work_dir: Path,
        ports: Ports,
        host: str = "127.0.0.1",
        install: TritonInstall | None = None,
        log_verbose: int = 0,
        exit_timeout_s: int = 10,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.repository = repository
        self.work_dir = work_dir
        self.ports = ports
        self.host = host
        self.install = install or find_triton(work_dir)
        self.log_path = work_dir / "tritonserver.log"
        self._log_verbose = log_verbose
        self._exit_timeout_s = exit_timeout_s
        self._extra_args = extra_args
        self._regions_before: set[str] = set()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports.http}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports.grpc}"

    def command(self) -> list[str]:
        cmd = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--http-address={self.host}",
            f"--http-port={self.ports.http}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.ports.grpc}",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.ports.metrics}",
            "--allow-gpu-metrics=false",
            f"--exit-timeout-secs={self._exit_timeout_s}",
            f"--log-verbose={self._log_verbose}",
        ]
        if self.install.backend_dir is not None:
            cmd.append(f"--backend-directory={self.install.backend_dir}")
        return [*cmd, *self._extra_args]

    def start(self) -> None:
        self._regions_before = python_backend_regions()
        env = {**os.environ, **self.install.env}
        log = self.log_path.open("ab")
        try:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, cwd=self.work_dir,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )  # fmt: skip
        except OSError as e:
            raise TritonError(f"cannot run {self.install.binary}: {e}") from e
        finally:
            log.close()

    def log_tail(self, lines: int = 1) -> str:
        """Triton's error messages, tracebacks cut and repeats dropped (the first `lines`), on
        one line; else the log's last lines."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        messages: list[str] = []
        for line in text:
            if not line.startswith("E") or "Cuda" in line or "CUDA" in line:
                continue
            message = line.split("] ", 1)[-1].strip().strip('"')
            message = message.split("\\n\\nAt:", 1)[0].replace("\\n", " ").strip()
            if not any(message in seen or seen in message for seen in messages):
                messages.append(message)
        if messages:
            return " | ".join(messages[:lines])
        return "\n".join(text[-lines:])

    def _get(self, path: str) -> int:
        url = f"http://{self.http_url}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2.0) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as e:
            return int(e.code)
        except (urllib.error.URLError, OSError):
            return 0

    def wait_ready(
        self,
        timeout_s: float = 120.0,
        models: tuple[str, ...] = (LLM_MODEL,),
        cancel: threading.Event | None = None,
    ) -> None:
        """Poll readiness until `timeout_s` (or until `cancel` is set: returns at once);
        TritonError with the log's error lines when Triton exits or stays unready."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if cancel is not None and cancel.is_set():
                return
            if self.process is not None and self.process.poll() is not None:
                raise TritonError(
                    f"tritonserver exited with status {self.process.returncode} before it was "
                    f"ready: {self.log_tail()} (log {self.log_path})"
                )
            if self._get("/v2/health/ready") == 200 and all(
                self._get(f"/v2/models/{m}/ready") == 200 for m in models
            ):
                return
            time.sleep(0.1)
        raise TritonError(
            f"tritonserver not ready after {timeout_s:.0f} s: {self.log_tail()} "
            f"(log {self.log_path})"
        )

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after `timeout_s`; returns the exit status."""
        proc = self.process
        if proc is None:
            return None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            logger.warning("tritonserver did not stop in %.0f s: killing it", timeout_s)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # The stubs live in the same group; make sure none outlives the server.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        _wait_group_gone(proc.pid, timeout_s=2.0)  # a dying stub still maps its region
        remove_orphans(self._regions_before)  # what stubs killed while it ran left in /dev/shm
        return proc.returncode


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Until no process of the group is left (SIGKILL is delivered asynchronously)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.02)


@contextlib.contextmanager
def running_triton(
    spec: RepositorySpec,
    *,
    source: Path | None = None,
    work_dir: Path | None = None,
    ports: Ports | None = None,
    host: str = "127.0.0.1",
    ready_timeout_s: float = 120.0,
    ready_models: tuple[str, ...] = (LLM_MODEL,),
    extra_args: tuple[str, ...] = (),
) -> Iterator[TritonServer]:
    """A started, ready TritonServer, always stopped on exit (tests, benchmarks)."""
    owned = work_dir is None
    folder = Path(tempfile.mkdtemp(prefix="throttllem-triton-")) if work_dir is None else work_dir
    server: TritonServer | None = None
    try:
        repo = build_repository(source or source_model_repository(), folder / "models", spec)
        server = TritonServer(repo, work_dir=folder, ports=ports or Ports.free(host), host=host,
                              extra_args=extra_args)  # fmt: skip
        server.start()
        server.wait_ready(ready_timeout_s, ready_models)
        yield server
    finally:
        if server is not None:
            server.stop()
        if owned:
            shutil.rmtree(folder, ignore_errors=True)
