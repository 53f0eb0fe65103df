"""The Tiltfile evaluated by a real Starlark interpreter (starlark-pyo3, the Rust implementation)
against stand-ins for the Tilt builtins it calls. Each stand-in takes exactly Tilt's
parameters (names and defaults of the Tiltfile API reference), so a misspelt or unknown
argument fails here as it would under `tilt up`, and records what the Tiltfile declares."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import starlark as sl

TRIGGER_MODE_AUTO = 1
TRIGGER_MODE_MANUAL = 2

# Tilt's `os` and `config` are modules; Starlark gets them as structs of the stand-ins.
# One line, so that the Tiltfile's own line numbers are off by exactly one in errors.
PRELUDE = (
    "os = struct(getenv = _os_getenv, getcwd = _os_getcwd, path = struct(abspath = _os_path_abspath, "
    "exists = _os_path_exists, join = _os_path_join, dirname = _os_path_dirname, "
    "basename = _os_path_basename)); "
    "config = struct(define_bool = _config_define_bool, define_string = _config_define_string, "
    "parse = _config_parse)\n"
)


class TiltfileError(Exception):
    pass


def _strings(value: Any, what: str) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    if not all(isinstance(item, str) for item in items):
        raise TiltfileError(f"{what} must be a string or a list of strings, got {value!r}")
    return items


def _cmd(value: Any, what: str) -> list[str] | str:
    if isinstance(value, str):
        return value
    return _strings(value, what)


@dataclass
class Tilt:
    """`Tilt(root, env, args).evaluate()`: what the Tiltfile declares for this environment and
    these Tiltfile args (`tilt up -- <args>`)."""

    root: Path
    env: dict[str, str] = field(default_factory=dict)
    args: list[str] = field(default_factory=list)
    local_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    docker_composes: list[dict[str, Any]] = field(default_factory=list)
    dc_resources: dict[str, dict[str, Any]] = field(default_factory=dict)
    docker_builds: list[dict[str, Any]] = field(default_factory=list)
    local_commands: list[str] = field(default_factory=list)
    flags: dict[str, dict[str, Any]] = field(default_factory=dict)

    # -- resources ------------------------------------------------------------------------------
    def local_resource(self, name, cmd="", deps=None, trigger_mode=TRIGGER_MODE_AUTO, resource_deps=[],
                       ignore=[], auto_init=True, serve_cmd="", cmd_bat="", serve_cmd_bat="",
                       allow_parallel=False, links=[], tags=[], env={}, serve_env={}, readiness_probe=None,
                       dir="", serve_dir="", labels=[]):
        if name in self.local_resources:
            raise TiltfileError(f"Local resource {name} has been defined multiple times")
        if not cmd and not serve_cmd:
            raise TiltfileError("local_resource must have a cmd and/or a serve_cmd, but both were empty")
        self.local_resources[name] = dict(
            cmd=_cmd(cmd, "cmd"), serve_cmd=_cmd(serve_cmd, "serve_cmd"), deps=_strings(deps, "deps"),
            trigger_mode=trigger_mode, resource_deps=_strings(resource_deps, "resource_deps"),
            ignore=_strings(ignore, "ignore"), auto_init=auto_init, links=[self._link(x) for x in links],
            env=dict(env), serve_env=dict(serve_env), readiness_probe=readiness_probe, dir=dir,
            serve_dir=serve_dir, labels=_strings(labels, "labels"))

    def docker_compose(self, configPaths, env_file=None, project_name="", profiles=[], wait=False):  # noqa: N803
        self.docker_composes.append(dict(config_paths=_strings(configPaths, "configPaths"), env_file=env_file,
                                         project_name=project_name, profiles=list(profiles), wait=wait))

    def dc_resource(self, name, trigger_mode=TRIGGER_MODE_AUTO, resource_deps=[], links=[], labels=[],
                    auto_init=True, project_name="", new_name="", infra=False):
        if not self.docker_composes:
            raise TiltfileError("dc_resource before docker_compose: no Docker Compose services known")
        self.dc_resources[name] = dict(resource_deps=_strings(resource_deps, "resource_deps"),
                                       links=[self._link(x) for x in links], labels=_strings(labels, "labels"),
                                       auto_init=auto_init, infra=infra)

    def docker_build(self, ref, context, build_args={}, dockerfile="Dockerfile", dockerfile_contents="",
                     live_update=[], match_in_env_vars=False, ignore=[], only=[], entrypoint=[], target="",
                     ssh="", network="", secret="", extra_tag="", container_args=None, cache_from=[], pull=False,
                     platform="", extra_hosts=[]):
        self.docker_builds.append(dict(ref=ref, context=context, build_args=dict(build_args),
                                       dockerfile=dockerfile, only=_strings(only, "only")))

    # -- values ---------------------------------------------------------------------------------
    @staticmethod
    def _link(value: Any) -> dict[str, str]:
        if isinstance(value, str):
            return {"url": value, "name": ""}
        if isinstance(value, dict) and value.get("kind") == "link":
            return {"url": value["url"], "name": value["name"]}
        raise TiltfileError(f"links must be strings or link(), got {value!r}")

    @staticmethod
    def link(url, name=""):
        return {"kind": "link", "url": url, "name": name}

    @staticmethod
    def probe(initial_delay_secs=0, timeout_secs=1, period_secs=10, success_threshold=1, failure_threshold=3,
              exec=None, http_get=None, tcp_socket=None):
        if sum(x is not None for x in (exec, http_get, tcp_socket)) != 1:
            raise TiltfileError("exactly one of exec, http_get, or tcp_socket must be specified")
        return dict(kind="probe", initial_delay_secs=initial_delay_secs, timeout_secs=timeout_secs,
                    period_secs=period_secs, success_threshold=success_threshold,
                    failure_threshold=failure_threshold, exec=exec, http_get=http_get, tcp_socket=tcp_socket)

    @staticmethod
    def http_get_action(port, host="", scheme="http", path=""):
        return dict(kind="http_get", port=int(port), host=host, scheme=scheme, path=path)

    @staticmethod
    def tcp_socket_action(port, host=""):
        return dict(kind="tcp_socket", port=int(port), host=host)

    @staticmethod
    def exec_action(command):
        return dict(kind="exec", command=_strings(command, "command"))

    @staticmethod
    def encode_json(obj):
        return json.dumps(obj, indent=2)

    def local(self, command, quiet=False, command_bat="", echo_off=False, env={}, dir="", stdin=None):
        self.local_commands.append(command if isinstance(command, str) else " ".join(command))
        return ""

    def read_file(self, file_path, default=None):
        path = self.root / file_path
        if path.exists():
            return path.read_text()
        if default is None:
            raise TiltfileError(f"read_file: {file_path} does not exist")
        return default

    @staticmethod
    def fail(msg):
        raise TiltfileError(f"fail(): {msg}")

    # -- os and config ----------------------------------------------------------------------------
    def _os_getenv(self, key, default=None):
        return self.env.get(key, default)

    def _os_getcwd(self):
        return str(self.root)

    def _os_path_abspath(self, path):
        return os.path.normpath(os.path.join(self.root, path))

    def _os_path_exists(self, path):
        return (self.root / path).exists()

    @staticmethod
    def _os_path_join(path, *paths):
        return os.path.join(path, *paths)

    @staticmethod
    def _os_path_dirname(path):
        return os.path.dirname(path)

    @staticmethod
    def _os_path_basename(path):
        return os.path.basename(path)

    def _config_define_bool(self, name, args=False, usage=""):
        self.flags[name] = dict(kind="bool", args=args, usage=usage)

    def _config_define_string(self, name, args=False, usage=""):
        self.flags[name] = dict(kind="string", args=args, usage=usage)

    def _config_parse(self):
        """Tilt's flag syntax: `--name` / `--name=false` for a bool, `--name value` for a string."""
        values: dict[str, Any] = {}
        args = list(self.args)
        while args:
            arg = args.pop(0)
            if not arg.startswith("--"):
                raise TiltfileError(f"unexpected Tiltfile arg {arg!r}")
            name, sep, raw = arg[2:].partition("=")
            if name not in self.flags:
                raise TiltfileError(f"unknown Tiltfile flag --{name}")
            if self.flags[name]["kind"] == "bool":
                values[name] = (raw.lower() != "false") if sep else True
            else:
                values[name] = raw if sep else args.pop(0)
        return values

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, tiltfile: str = "Tiltfile") -> Tilt:
        module = sl.Module()
        for name in ("local_resource", "docker_compose", "dc_resource", "docker_build", "link", "probe",
                     "http_get_action", "tcp_socket_action", "exec_action", "encode_json", "local", "read_file",
                     "fail", "_os_getenv", "_os_getcwd", "_os_path_abspath", "_os_path_exists", "_os_path_join",
                     "_os_path_dirname", "_os_path_basename", "_config_define_bool", "_config_define_string",
                     "_config_parse"):
            module.add_callable(name, getattr(self, name))
        module["TRIGGER_MODE_AUTO"] = TRIGGER_MODE_AUTO
        module["TRIGGER_MODE_MANUAL"] = TRIGGER_MODE_MANUAL
        source = PRELUDE + (self.root / tiltfile).read_text()
        dialect = sl.Dialect.standard()
        dialect.enable_keyword_only_arguments = True
        dialect.enable_top_level_stmt = True  # Tilt allows if/for at the top level
        ast = sl.parse(tiltfile, source, dialect)
        globals_ = sl.Globals.extended_by([sl.LibraryExtension.StructType, sl.LibraryExtension.Print])
        sl.eval(module, ast, globals_)
        return self

    # -- reading the result ---------------------------------------------------------------------
    def resource_names(self) -> list[str]:
        return [*self.local_resources, *self.dc_resources]
