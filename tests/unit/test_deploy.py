"""Static checks of the production path: Dockerfile, compose and Kubernetes agree with the code.

Docker cannot run on the build machines, so these files are checked by reading them: every
YAML parses, every `meshserve …` they run is accepted by the real CLI parser, and ports, env
names, Consul service names, paths and probes agree with what the code listens on and reads.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import re
import shlex
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from meshserve.cli import build_parser
from meshserve.inference import artifacts, shards
from meshserve.registry.config import DEFAULT_CONSUL_HTTP_ADDR, SERVICE_NAMES, RegistryConfig
from meshserve.servers.cli import KINDS
from meshserve.servers.servicer import SERVICE_NAME as PREDICTION_SERVICE

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "k8s"
DOCKERFILE = REPO / "Dockerfile"

# Commands the deploy files run that have not landed yet. Strict: the moment one lands its
# case XPASSes and fails, so the mark must go (and the command line is then really checked).
# Commands the deploy files may name before they exist (strict xfail until they land).
PENDING: dict[tuple[str, ...], str] = {}

# Env names a container may carry that meshserve itself does not read.
IMAGE_ONLY_ENV = {"VIRTUAL_ENV", "PATH", "PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE",
                  "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK"}  # fmt: skip
K8S_HELPER_ENV = {"HOST_IP", "POD_IP"}  # downward API values, only used inside $(…)
CONTRACT_ENV = {"CONSUL_HTTP_ADDR", "CONSUL_HTTP_TOKEN", "MESHSERVE_HOME",
                "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"}  # fmt: skip
ROOM_DIRS = ("meshserve", "registry", "servers", "gateway", "training")


# --------------------------------------------------------------------------- reading the files


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str


def dockerfile() -> list[Instruction]:
    """Instructions with continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, value = line.partition(" ")
        out.append(Instruction(keyword.upper(), value.strip()))
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def docker_values(keyword: str) -> list[str]:
    return [i.value for i in dockerfile() if i.keyword == keyword]


def docker_env() -> dict[str, str]:
    """ENV of the final stage (`ENV K=V K2="V 2"` form)."""
    stages = "\n".join(f"{i.keyword} {i.value}" for i in dockerfile()).split("\nFROM ")
    env: dict[str, str] = {}
    for line in stages[-1].splitlines():
        if line.startswith("ENV "):
            for pair in shlex.split(line[4:]):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


# The C loader when PyYAML has it: the pure-Python one takes seconds over these files.
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@functools.cache
def compose() -> dict[str, Any]:
    return yaml.load(COMPOSE_FILE.read_text(), Loader=_Loader)  # noqa: S506 - a safe loader


@functools.cache
def _k8s_docs() -> tuple[dict[str, Any], ...]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.load_all(path.read_text(), Loader=_Loader):  # noqa: S506 - a safe loader
            assert doc is not None, f"{path.name} has an empty YAML document"
            docs.append({**doc, "_file": path.name})
    return tuple(docs)


def k8s_docs() -> list[dict[str, Any]]:
    return list(_k8s_docs())


def compose_default(text: str) -> str:
    """Compose's `${VAR:-default}` interpolation with VAR unset."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", text)


def k8s_of(kind: str) -> list[dict[str, Any]]:
    return [d for d in k8s_docs() if d["kind"] == kind]


def pod_specs() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, pod spec) for every Deployment, StatefulSet and Job."""
    for doc in k8s_docs():
        if doc["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield doc, doc["spec"]["template"]["spec"]


def is_meshserve_image(image: str) -> bool:
    return compose_default(image).split("/")[-1].split(":")[0] == "meshserve"


def flag(argv: list[str], name: str) -> str | None:
    """The value of `--name V` in argv (None when absent)."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def role_of(argv: list[str]) -> str | None:
    """detector/embedder/…/gateway for a long-running server command, else None."""
    if argv[:1] == ["gateway"]:
        return "gateway"
    if argv[:1] == ["serve"] and len(argv) > 1:
        return argv[1]
    return None


@dataclass(frozen=True)
class CommandLine:
    where: str
    argv: tuple[str, ...]


def command_lines() -> list[CommandLine]:
    """Every meshserve argv that the Dockerfile, compose and the manifests run."""
    lines: list[CommandLine] = []
    entrypoint = json.loads(docker_values("ENTRYPOINT")[-1])
    assert entrypoint == ["meshserve"], entrypoint
    for cmd in docker_values("CMD"):
        lines.append(CommandLine("Dockerfile CMD", tuple(json.loads(cmd))))
    for check in docker_values("HEALTHCHECK"):
        exec_form = json.loads(check.split(" CMD ", 1)[1])
        assert exec_form[0] == "meshserve", exec_form
        lines.append(CommandLine("Dockerfile HEALTHCHECK", tuple(exec_form[1:])))
    for name, svc in compose()["services"].items():
        if not is_meshserve_image(svc.get("image", "")):
            continue
        lines.append(CommandLine(f"compose {name} command", tuple(svc["command"])))
        test = svc.get("healthcheck", {}).get("test")
        if test:
            assert test[:2] == ["CMD", "meshserve"], (name, test)
            lines.append(CommandLine(f"compose {name} healthcheck", tuple(test[2:])))
    for workload, spec in pod_specs():
        for container in spec.get("initContainers", []) + spec["containers"]:
            if not is_meshserve_image(container["image"]):
                continue
            where = f"k8s {workload['metadata']['name']}/{container['name']}"
            command = container.get("command")
            if command is None:
                lines.append(CommandLine(where, tuple(container["args"])))
            elif command[0] == "meshserve":
                lines.append(CommandLine(where, tuple(command[1:] + container.get("args", []))))
    return lines


def _param(line: CommandLine) -> Any:
    for prefix, reason in PENDING.items():
        if line.argv[: len(prefix)] == prefix:
            return pytest.param(line, id=line.where, marks=pytest.mark.xfail(strict=True, reason=reason))
    return pytest.param(line, id=line.where)


# --------------------------------------------------------------------------- every command exists


@pytest.fixture(scope="module")
def parser() -> Any:
    return build_parser()


@pytest.mark.parametrize("line", [_param(line) for line in command_lines()])
def test_every_meshserve_command_line_is_accepted_by_the_cli(parser: Any, line: CommandLine) -> None:
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            args = parser.parse_args(list(line.argv))
    except SystemExit as exc:
        if exc.code == 0 and "--help" in line.argv:
            return  # `meshserve --help`, the image's default CMD
        pytest.fail(f"{line.where}: `meshserve {shlex.join(line.argv)}` is rejected:\n{err.getvalue()}")
    assert hasattr(args, "func"), f"{line.where}: `meshserve {shlex.join(line.argv)}` runs nothing"


def test_the_files_run_every_role() -> None:
    lines = command_lines()
    for source in ("compose", "k8s"):
        roles = {role_of(list(line.argv)) for line in lines if line.where.startswith(source)}
        assert set(SERVICE_NAMES) <= roles, (source, sorted(set(SERVICE_NAMES) - roles))
        firsts = {line.argv[:2] for line in lines if line.where.startswith(source)}
        assert ("train", "--quick") in firsts, source
        assert ("shard", "build") in firsts, source


# --------------------------------------------------------------------------- Dockerfile


def test_image_builds_from_python_311_slim_with_cpu_torch_pinned_like_pyproject() -> None:
    args = dict(v.split("=", 1) for v in docker_values("ARG") if "=" in v)
    assert args["PYTHON_IMAGE"] == "python:3.11-slim"
    assert all(v.split()[0] == "${PYTHON_IMAGE}" for v in docker_values("FROM"))
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = {d.split("==")[0]: d for d in deps if "==" in d}
    torch_runs = [r for r in docker_values("RUN") if "torch==" in r]
    assert len(torch_runs) == 1, torch_runs
    assert pins["torch"] in torch_runs[0] and pins["torchvision"] in torch_runs[0]
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert '--index-url "$TORCH_INDEX_URL"' in torch_runs[0]
    assert any(re.search(r"\bpip install \.(\s|$)", r) for r in docker_values("RUN"))


def test_image_holds_every_room_that_pip_install_needs() -> None:
    copied = {v.split()[0].rstrip("/") for v in docker_values("COPY") if not v.startswith("--from")}
    package_dirs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert set(package_dirs.values()) <= copied, sorted(set(package_dirs.values()) - copied)
    assert set(ROOM_DIRS) <= copied
    assert "pyproject.toml" in " ".join(docker_values("COPY"))
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    needed = set(package_dirs.values()) | {"pyproject.toml", "README.md"}
    assert not needed & ignored, f".dockerignore drops what the build copies: {needed & ignored}"
    assert {".git", "tests"} <= ignored


def test_image_runs_as_a_numeric_non_root_user_with_a_home_volume() -> None:
    users = docker_values("USER")
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, users[-1]
    home = docker_env()["MESHSERVE_HOME"]
    assert home in json.loads(docker_values("VOLUME")[-1])
    chowns = [r for r in docker_values("RUN") if "useradd" in r]
    assert chowns and f"--uid {uid}" in chowns[0] and f"chown meshserve:meshserve {home}" in chowns[0]


def test_healthcheck_asks_the_grpc_health_service_on_an_exposed_port() -> None:
    (check,) = docker_values("HEALTHCHECK")
    options, _, exec_form = check.partition(" CMD ")
    argv = json.loads(exec_form)
    assert argv[:2] == ["meshserve", "health"]
    port = int(argv[2].rsplit(":", 1)[1])
    exposed = {int(p) for v in docker_values("EXPOSE") for p in v.split()}
    assert port in exposed
    timeout = float(re.search(r"--timeout=(\d+)s", options).group(1))  # type: ignore[union-attr]
    assert float(flag(argv, "--timeout") or 2.0) < timeout, "the probe must give up before Docker does"
    for line in command_lines():
        if role_of(list(line.argv)) and line.where.startswith(("compose", "k8s")):
            assert int(flag(list(line.argv), "--port") or 0) in exposed, line
            assert int(flag(list(line.argv), "--metrics-port") or 0) in exposed, line


def test_no_secret_is_baked_into_the_image() -> None:
    names = set(docker_env()) | {v.split("=")[0] for v in docker_values("ARG")}
    secretish = {n for n in names if re.search(r"TOKEN|SECRET|PASSWORD|KEY", n)}
    assert not secretish, secretish
    assert "CONSUL_HTTP_TOKEN" not in DOCKERFILE.read_text()


# --------------------------------------------------------------------------- compose


def compose_servers() -> Iterator[tuple[str, dict[str, Any], list[str], str]]:
    for name, svc in compose()["services"].items():
        if is_meshserve_image(svc.get("image", "")):
            argv = list(svc["command"])
            role = role_of(argv)
            if role:
                yield name, svc, argv, role


def test_compose_has_consul_dev_agent_and_jaeger_receiving_otlp() -> None:
    services = compose()["services"]
    consul = services["consul"]
    assert consul["image"].startswith("hashicorp/consul:")
    assert "-dev" in consul["command"] and "-client=0.0.0.0" in consul["command"]
    assert "8500:8500" in consul["ports"]
    assert consul["healthcheck"]["test"][:2] == ["CMD", "consul"]
    jaeger = services["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one:")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"


def test_compose_servers_are_reachable_registered_and_traced() -> None:
    image_home = docker_env()["MESHSERVE_HOME"]
    counts: dict[str, int] = {}
    for name, svc, argv, role in compose_servers():
        counts[role] = counts.get(role, 0) + 1
        # Consul (another container) runs the gRPC check against the advertised address.
        assert flag(argv, "--host") == "0.0.0.0", name
        assert flag(argv, "--advertise-address") == name, name
        assert flag(argv, "--consul") is None, f"{name}: the address belongs in CONSUL_HTTP_ADDR"
        env = svc["environment"]
        assert env["CONSUL_HTTP_ADDR"] == "http://consul:8500", name
        assert RegistryConfig.from_env(http_addr=env["CONSUL_HTTP_ADDR"]).port == 8500
        assert env["CONSUL_HTTP_TOKEN"] == "${CONSUL_HTTP_TOKEN:-}", f"{name}: tokens come from the shell"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317", name
        assert env["OTEL_SERVICE_NAME"] == SERVICE_NAMES[role], name
        assert f"meshserve-home:{image_home}" in svc["volumes"], name
        grace = float(flag(argv, "--grace") or 10.0)
        stop = float(svc["stop_grace_period"].rstrip("s"))
        assert stop > grace + 5, f"{name}: Docker would SIGKILL before the drain ends"
    assert counts.get("detector", 0) >= 2 and counts.get("embedder", 0) >= 2, counts
    assert set(counts) == set(SERVICE_NAMES), counts


def test_compose_healthchecks_probe_the_port_each_server_listens_on() -> None:
    for name, svc, argv, role in compose_servers():
        test = svc["healthcheck"]["test"]
        assert test[:3] == ["CMD", "meshserve", "health"], name
        host, port = test[3].rsplit(":", 1)
        assert host == "127.0.0.1" and port == flag(argv, "--port"), name
        expected = None if role == "gateway" else PREDICTION_SERVICE
        assert flag(test, "--service") == expected, name
    gateway = compose()["services"]["gateway"]
    published = {p.split(":")[1] for p in gateway["ports"]}
    assert flag(gateway["command"], "--port") in published


def test_compose_jobs_run_once_and_everything_waits_for_what_it_reads() -> None:
    services = compose()["services"]
    allowed = {"service_started", "service_healthy", "service_completed_successfully"}
    for name, svc in services.items():
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services, (name, dep)
            assert cond["condition"] in allowed, (name, dep)

    def upstream(name: str) -> set[str]:
        seen: set[str] = set()
        todo = [name]
        while todo:
            for dep in services[todo.pop()].get("depends_on", {}):
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    shard_jobs = {}
    for name, svc in services.items():
        argv = svc.get("command", [])
        if argv[:1] in (["train"], ["shard"]):
            assert svc["restart"] == "no" and svc["healthcheck"] == {"disable": True}, name
        if argv[:2] == ["shard", "build"]:
            out = flag(argv, "-o")
            assert out is not None and out.startswith(docker_env()["MESHSERVE_HOME"] + "/"), name
            shard_jobs[out] = name
            assert services[name]["depends_on"]["train"]["condition"] == "service_completed_successfully"
    for name, svc, argv, role in compose_servers():
        assert svc["depends_on"]["consul"]["condition"] == "service_healthy", name
        if role == "indexer":
            job = shard_jobs[flag(argv, "--shard") or ""]
            assert svc["depends_on"][job]["condition"] == "service_completed_successfully", name
        elif role != "gateway":
            assert svc["depends_on"]["train"]["condition"] == "service_completed_successfully", name
        else:
            assert "train" in upstream(name)
    assert len(shard_jobs) >= 2, "at least two shards, so coverage means something"


# --------------------------------------------------------------------------- Kubernetes


def test_every_manifest_parses_and_the_kustomization_lists_them() -> None:
    docs = k8s_docs()
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind"), doc["_file"]
    (kustomization,) = [d for d in docs if d["kind"] == "Kustomization"]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    assert [i["name"] for i in kustomization["images"]] == ["meshserve"]


def k8s_servers() -> Iterator[tuple[dict[str, Any], dict[str, Any], dict[str, Any], list[str], str]]:
    for workload, spec in pod_specs():
        for container in spec["containers"]:
            if is_meshserve_image(container["image"]) and "command" not in container:
                role = role_of(container["args"])
                if role:
                    yield workload, spec, container, container["args"], role


def test_k8s_has_a_deployment_per_role_and_an_indexer_per_shard() -> None:
    replicas: dict[str, int] = {}
    for workload, _, _, _, role in k8s_servers():
        assert workload["kind"] == "Deployment", workload["metadata"]["name"]
        replicas[role] = replicas.get(role, 0) + workload["spec"]["replicas"]
    assert set(replicas) == set(SERVICE_NAMES), replicas
    assert replicas["detector"] >= 2 and replicas["embedder"] >= 2 and replicas["gateway"] >= 2
    built = {flag(c["args"], "-o") for _, s in pod_specs() for c in s["containers"]
             if c.get("args", [])[:2] == ["shard", "build"]}  # fmt: skip
    served = {flag(argv, "--shard") for _, _, _, argv, role in k8s_servers() if role == "indexer"}
    assert len(built) >= 2 and built == served


def test_k8s_probes_use_grpc_on_the_port_the_server_listens_on() -> None:
    for workload, _, container, argv, role in k8s_servers():
        name = workload["metadata"]["name"]
        port = int(flag(argv, "--port") or 0)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == port and ports["metrics"] == int(flag(argv, "--metrics-port") or 0), name
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            grpc = container[probe]["grpc"]
            assert grpc["port"] == port, (name, probe)
        expected = "" if role == "gateway" else PREDICTION_SERVICE
        assert container["readinessProbe"]["grpc"].get("service", "") == expected, name
        assert container["startupProbe"]["grpc"].get("service", "") == expected, name
        # Liveness asks about the whole process, not whether the model is ready.
        assert container["livenessProbe"]["grpc"].get("service", "") == "", name


def test_k8s_pods_drain_before_they_are_killed() -> None:
    for workload, spec, container, argv, _ in k8s_servers():
        name = workload["metadata"]["name"]
        pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
        assert pre_stop[0] == "sleep", name
        grace = float(flag(argv, "--grace") or 10.0)
        assert spec["terminationGracePeriodSeconds"] > float(pre_stop[1]) + grace, name
        strategy = workload["spec"]["strategy"]["rollingUpdate"]
        assert strategy["maxUnavailable"] == 0, name


def _cpu(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _mem_mi(value: str) -> float:
    units = {"Mi": 1.0, "Gi": 1024.0}
    return float(value[:-2]) * units[value[-2:]]


def test_k8s_resources_fit_two_core_nodes_and_threads_match_the_cpu_limit() -> None:
    for workload, spec in pod_specs():
        for container in spec.get("initContainers", []) + spec["containers"]:
            where = f"{workload['metadata']['name']}/{container['name']}"
            res = container["resources"]
            req_cpu, lim_cpu = _cpu(res["requests"]["cpu"]), _cpu(res["limits"]["cpu"])
            assert 0 < req_cpu <= lim_cpu <= 2, where
            assert 0 < _mem_mi(res["requests"]["memory"]) <= _mem_mi(res["limits"]["memory"]), where
            threads = flag(container.get("args", []), "--threads")
            if threads is not None:
                assert lim_cpu == int(threads), f"{where}: --threads {threads} vs CPU limit {lim_cpu}"
    for _, _, _, argv, role in k8s_servers():
        if role != "gateway":
            assert flag(argv, "--threads") is not None, f"{role}: set --threads to the CPU limit"


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def test_k8s_servers_reach_the_node_consul_agent_and_advertise_their_pod_ip() -> None:
    for workload, _, container, argv, role in k8s_servers():
        name = workload["metadata"]["name"]
        env = _env(container)
        order = [e["name"] for e in container["env"]]
        assert env["HOST_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.hostIP", name
        assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP", name
        addr = env["CONSUL_HTTP_ADDR"]["value"]
        assert addr == "http://$(HOST_IP):8500", name
        assert order.index("HOST_IP") < order.index("CONSUL_HTTP_ADDR"), f"{name}: $(HOST_IP) defined later"
        config = RegistryConfig.from_env(http_addr=addr.replace("$(HOST_IP)", "10.0.0.7"))
        assert config.port == RegistryConfig.from_env(http_addr=DEFAULT_CONSUL_HTTP_ADDR).port
        token = env["CONSUL_HTTP_TOKEN"]["valueFrom"]["secretKeyRef"]
        assert token["optional"] is True and "value" not in env["CONSUL_HTTP_TOKEN"], name
        assert token["key"] == role, f"{name}: each workload reads its own registry token"
        assert env["OTEL_SERVICE_NAME"]["value"] == SERVICE_NAMES[role], name
        assert flag(argv, "--host") == "0.0.0.0" and flag(argv, "--advertise-address") == "$(POD_IP)", name
        for ref in re.findall(r"\$\((\w+)\)", " ".join(argv)):
            assert ref in env, f"{name}: args use $({ref}) which is not in env"
        assert {"configMapRef": {"name": "meshserve-env"}} in container["envFrom"], name


def test_k8s_services_select_pods_and_name_their_ports() -> None:
    pods = [(w, s) for w, s in pod_specs() if w["kind"] == "Deployment"]
    for workload, _ in pods:
        selector = workload["spec"]["selector"]["matchLabels"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), workload["metadata"]["name"]
    for service in k8s_of("Service"):
        wanted = service["spec"]["selector"].items()
        selected = [(w, s) for w, s in pods if wanted <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert selected, f"Service {service['metadata']['name']} selects no pod"
        for _, spec in selected:
            names = {p["name"] for c in spec["containers"] for p in c.get("ports", [])}
            for port in service["spec"]["ports"]:
                assert port["targetPort"] in names, (service["metadata"]["name"], port)


def test_k8s_volumes_jobs_and_waits_agree_with_the_artifact_layout() -> None:
    home = docker_env()["MESHSERVE_HOME"]
    (config,) = k8s_of("ConfigMap")
    assert config["data"]["MESHSERVE_HOME"] == home
    claims = {c["metadata"]["name"] for c in k8s_of("PersistentVolumeClaim")}
    uid = int(docker_values("USER")[-1].split(":")[0])
    for workload, spec in pod_specs():
        name = workload["metadata"]["name"]
        assert spec["securityContext"]["runAsNonRoot"] is True and spec["securityContext"]["runAsUser"] == uid
        for volume in spec["volumes"]:
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        for container in spec.get("initContainers", []) + spec["containers"]:
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert home in mounts, f"{name}/{container['name']}"
            if container.get("command", [""])[0] != "sh":
                continue
            script = container["command"][2]
            paths = re.findall(r"/var/lib/meshserve/\S+", script)
            assert paths, script
            for path in paths:
                rel = Path(path).relative_to(home)
                if rel.parts[0] == "models":
                    assert rel.parts[1] in artifacts.KINDS and rel.name == artifacts.CARD_NAME, path
                else:
                    assert rel.parts[0] == "shards" and rel.name == shards.MANIFEST_FILE, path
                    served = [flag(c["args"], "--shard") for c in spec["containers"]]
                    assert str(Path(path).parent) in served, f"{name} waits for a shard it does not serve"
    jobs = {j["metadata"]["name"]: j for j in k8s_of("Job")}
    train = [j for j in jobs.values() if j["spec"]["template"]["spec"]["containers"][0]["args"][0] == "train"]
    assert len(train) == 1 and train[0]["spec"]["template"]["spec"]["restartPolicy"] == "Never"


# --------------------------------------------------------------------------- names agree with the code


def env_names_read_by_code() -> set[str]:
    pattern = re.compile(r"""(?:environ|env)(?:\.get)?[(\[]\s*["']([A-Z][A-Z0-9_]+)["']""")
    names: set[str] = set()
    for room in ROOM_DIRS:
        for path in (REPO / room).rglob("*.py"):
            names |= set(pattern.findall(path.read_text()))
    return names


def env_names_in_deploy_files() -> dict[str, set[str]]:
    found: dict[str, set[str]] = {"Dockerfile": set(docker_env())}
    compose_env: set[str] = set()
    for svc in compose()["services"].values():
        if is_meshserve_image(svc.get("image", "")):
            compose_env |= set(svc.get("environment", {}))
    found["compose"] = compose_env
    k8s_env: set[str] = set()
    for _, spec in pod_specs():
        for container in spec.get("initContainers", []) + spec["containers"]:
            k8s_env |= set(_env(container))
    for config in k8s_of("ConfigMap"):
        k8s_env |= set(config["data"])
    found["k8s"] = k8s_env
    return found


def test_every_env_name_the_files_set_is_one_the_code_reads() -> None:
    read = env_names_read_by_code()
    assert CONTRACT_ENV <= read, f"the code no longer reads {CONTRACT_ENV - read}"
    for where, names in env_names_in_deploy_files().items():
        unknown = names - read - IMAGE_ONLY_ENV - K8S_HELPER_ENV
        assert not unknown, f"{where} sets {sorted(unknown)}, which no meshserve code reads"
    files = env_names_in_deploy_files()
    assert CONTRACT_ENV <= files["compose"] | files["Dockerfile"]
    assert CONTRACT_ENV <= files["k8s"]


def test_consul_service_names_of_the_roles_are_the_contract_names() -> None:
    for role in set(SERVICE_NAMES) - {"gateway"}:
        assert KINDS[role].service == SERVICE_NAMES[role], role
    for line in command_lines():
        argv = list(line.argv)
        override = flag(argv, "--service-name")
        assert override is None or override in SERVICE_NAMES.values(), line


# -- k8s-mtls: the overlay over every server ------------------------------------------------------


def test_k8s_mtls_overlay_gives_every_server_its_certificate_and_token_file_and_tls_probes() -> None:
    import shutil
    import subprocess

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl to render the kustomize overlay")
    rendered = subprocess.run([kubectl, "kustomize", str(DEPLOY / "k8s-mtls")], capture_output=True, text=True,
                              timeout=60, check=True).stdout  # fmt: skip
    servers = [d for d in yaml.safe_load_all(rendered) if d and d["kind"] == "Deployment"]
    roles = set()
    for workload in servers:
        spec = workload["spec"]["template"]["spec"]
        (container,) = spec["containers"]
        role = role_of(container["args"])
        assert role is not None, workload["metadata"]["name"]
        roles.add(role)
        env = {e["name"]: e.get("value") for e in container["env"]}
        secrets = {v["name"]: v["secret"] for v in spec["volumes"] if "secret" in v}
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert secrets["tls"]["secretName"] == f"{SERVICE_NAMES[role]}-tls"
        assert env["MESHSERVE_TLS_CERT"] == f"{mounts['tls']}/tls.crt"
        assert "CONSUL_HTTP_TOKEN" not in env  # the token is a file, never an env value
        assert secrets["consul-token"]["items"] == [{"key": role, "path": "token"}]
        assert env["CONSUL_HTTP_TOKEN_FILE"] == f"{mounts['consul-token']}/token"
        assert env["CONSUL_HTTP_ADDR"].startswith("https://")
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert "grpc" not in container[probe] and container[probe]["exec"]["command"][:2] == ["meshserve", "health"]
    assert roles == set(SERVICE_NAMES)
