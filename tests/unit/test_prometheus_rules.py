"""deploy/prometheus and deploy/grafana, checked: promtool accepts and unit-tests the rules, the configs are
valid, every metric they name is one the code exports, and the consul_sd relabelling gives the labels our
http_sd gives. Needs Prometheus's `promtool` (Debian: apt-get install prometheus; .ci/run installs it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest
import yaml

from meshserve.local.mesh_pki import MeshPki
from meshserve.local.prometheus import PrometheusConfig, write_config
from meshserve.registry.instances import Instance
from meshserve.registry.prometheus_sd import target_group, target_groups
from meshserve.rpc.tls_files import TlsFiles

REPO = Path(__file__).resolve().parents[2]
PROMETHEUS = REPO / "deploy" / "prometheus"
RULES = sorted((PROMETHEUS / "rules").glob("*.yml"))
RULE_TESTS = sorted((PROMETHEUS / "tests").glob("*.yml"))
DASHBOARD = REPO / "deploy" / "grafana" / "meshserve.json"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: apt-get install prometheus (see .ci/run)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=120, cwd=PROMETHEUS)


def test_promtool_checks_the_rules() -> None:
    assert RULES
    done = promtool("check", "rules", *map(str, RULES))
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    assert RULE_TESTS
    done = promtool("test", "rules", *map(str, RULE_TESTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_unit_test() -> None:
    alerts = {r["alert"] for path in RULES for g in yaml.safe_load(path.read_text())["groups"]
              for r in g["rules"] if "alert" in r}  # fmt: skip
    tested = {t["alertname"] for path in RULE_TESTS for case in yaml.safe_load(path.read_text())["tests"]
              for t in case.get("alert_rule_test", ())}  # fmt: skip
    assert alerts and alerts <= tested, f"alerts without a promtool test: {sorted(alerts - tested)}"


def test_the_http_sd_config_and_the_generated_one_are_valid(tmp_path: Path) -> None:
    done = promtool("check", "config", str(PROMETHEUS / "prometheus-http-sd.yml"))
    assert done.returncode == 0, done.stdout + done.stderr
    generated = write_config(PrometheusConfig("http://127.0.0.1:9091/targets"), tmp_path)
    done = promtool("check", "config", str(generated))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rule files found" in done.stdout  # the repository's rules are loaded
    # secure (`up` with mTLS): one job per service with its TLS server name and Prometheus's client certificate
    pki = MeshPki.prepare(tmp_path / "home", secure=True)
    assert pki is not None
    tls = TlsFiles.from_pki(pki.layout, "cli")
    secure = write_config(PrometheusConfig("http://127.0.0.1:9091/targets", tls=tls), tmp_path / "secure")
    done = promtool("check", "config", str(secure))
    assert done.returncode == 0, done.stdout + done.stderr
    jobs = yaml.safe_load(secure.read_text())["scrape_configs"]
    detector = next(j for j in jobs if j["tls_config"]["server_name"] == "meshserve-detector")
    assert detector["http_sd_configs"][0]["url"].endswith("/targets?service=meshserve-detector")
    assert detector["tls_config"]["cert_file"] == str(pki.layout.cert("cli"))
    assert detector["relabel_configs"] == [{"target_label": "job", "replacement": "meshserve"}]


# -- the metric names are the code's ------------------------------------------------------------


def exported_metric_names() -> set[str]:
    names = set()
    for room in ("gateway", "servers", "registry", "meshserve"):
        for path in (REPO / room).rglob("*.py"):
            names.update(re.findall(r'"(meshserve_[a-z_]+)"', path.read_text()))
    # counters built as metric families get their _total suffix at exposition
    return names | {f"{n}_total" for n in names if not n.endswith("_total")}


def referenced_metric_names(text: str) -> set[str]:
    found = set(re.findall(r"(?<![:\w])(meshserve_[a-z_]+)", text))
    return {re.sub(r"_(bucket|sum|count)$", "", n) for n in found}


def test_rules_and_dashboard_name_only_metrics_the_code_exports() -> None:
    exported = exported_metric_names()
    assert {"meshserve_gateway_stage_seconds", "meshserve_server_requests_total"} <= exported
    rule_exprs = {path.name: [r["expr"] for g in yaml.safe_load(path.read_text())["groups"] for r in g["rules"]]
                  for path in RULES}  # fmt: skip
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panel_exprs = [t["expr"] for p in panels for t in p.get("targets", ())]
    for name, exprs in {**rule_exprs, DASHBOARD.name: panel_exprs}.items():
        referenced = referenced_metric_names(" ".join(exprs))
        assert referenced, name
        assert referenced <= exported, f"{name} names metrics nobody exports: {sorted(referenced - exported)}"


def test_the_dashboard_has_a_panel_for_each_view() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", ()))
    for needed in ("meshserve_gateway_requests_total", "meshserve_gateway_stage_seconds_bucket",
                   "meshserve_server_latency_seconds_bucket", "meshserve_gateway_coverage",
                   "meshserve_server_batch_size", "meshserve_server_queue_delay_seconds_bucket",
                   'up{job="meshserve"}', "meshserve_registry_watch_staleness_seconds"):  # fmt: skip
        assert needed in exprs
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


# -- consul_sd relabelling ≡ our http_sd labels ---------------------------------------------------


def relabel(labels: dict[str, str], rules: list[dict[str, Any]]) -> dict[str, str] | None:
    """Prometheus's replace, keep and labelmap actions (anchored regexes), enough for our config."""
    for rule in rules:
        action = rule.get("action", "replace")
        regex = re.compile(f"^(?:{rule.get('regex', '(.*)')})$")
        replacement = re.sub(r"\$(\d+)", r"\\\1", str(rule.get("replacement", "$1")))
        if action == "labelmap":
            for name, value in list(labels.items()):
                if regex.match(name):
                    labels[regex.sub(replacement, name)] = value
            continue
        value = rule.get("separator", ";").join(labels.get(s, "") for s in rule["source_labels"])
        match = regex.match(value)
        if action == "keep":
            if not match:
                return None
        elif match:
            labels[rule["target_label"]] = match.expand(replacement)
    return {k: v for k, v in labels.items() if not k.startswith("__") or k in ("__address__", "__scheme__")}


def consul_sd_target(inst: Instance, health: str) -> dict[str, str]:
    """The labels consul_sd_configs gives one service instance (Prometheus's __meta_consul_* names)."""
    labels = {"__address__": f"{inst.address}:{inst.port}", "__meta_consul_address": "10.0.0.9",
              "__meta_consul_service": inst.name, "__meta_consul_service_id": inst.id,
              "__meta_consul_service_address": inst.address, "__meta_consul_service_port": str(inst.port),
              "__meta_consul_health": health}  # fmt: skip
    labels.update({f"__meta_consul_service_metadata_{k}": v for k, v in inst.meta.items()})
    return labels


@pytest.mark.parametrize("meta", [
    {"model": "embedder", "version": "7", "role": "embedder", "metrics_port": "9464"},
    {"model": "index", "version": "3", "role": "indexer", "shard": "base-1", "embedder_version": "7",
     "index": "catalogue", "dim": "64", "count": "20", "metric": "ip", "generation": "1", "metrics_port": "9465"},
    {"model": "detector", "version": "2", "role": "detector", "metrics_port": "9466", "metrics_scheme": "https"},
])  # fmt: skip
def test_consul_sd_relabelling_gives_the_labels_of_our_http_sd(meta: dict[str, str]) -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus-consul.yml").read_text())
    (job,) = config["scrape_configs"]
    inst = Instance(id=f"meshserve-{meta['role']}-10.1.2.3-50051", name=f"meshserve-{meta['role']}",
                    address="10.1.2.3", port=50051, meta=MappingProxyType(meta))  # fmt: skip
    ours = target_group(inst)
    assert ours is not None
    got = relabel(consul_sd_target(inst, "passing"), job["relabel_configs"])
    assert got is not None
    assert got.pop("__address__") == ours["targets"][0] == f"10.1.2.3:{meta['metrics_port']}"
    assert {k: v for k, v in got.items() if k in ours["labels"]} == ours["labels"]
    assert relabel(consul_sd_target(inst, "critical"), job["relabel_configs"]) is None
    without_port = {k: v for k, v in meta.items() if k != "metrics_port"}
    bare = Instance(id=inst.id, name=inst.name, address=inst.address, port=inst.port,
                    meta=MappingProxyType(without_port))  # fmt: skip
    assert target_group(bare) is None
    assert relabel(consul_sd_target(bare, "passing"), job["relabel_configs"]) is None


def test_a_process_registered_once_per_shard_is_one_target() -> None:
    def indexer(shard: str, port: int, metrics_port: str) -> Instance:
        meta = {"model": "index", "version": "3", "role": "indexer", "shard": shard, "embedder_version": "7",
                "index": "catalogue", "metrics_port": metrics_port}  # fmt: skip
        return Instance(id=f"meshserve-indexer-10.1.2.3-{port}-{shard}", name="meshserve-indexer",
                        address="10.1.2.3", port=port, meta=MappingProxyType(meta))  # fmt: skip

    grouped = [indexer("day-2", 50051, "9465"), indexer("day-0", 50051, "9465")]
    alone = indexer("day-1", 50052, "9466")
    groups = target_groups([*grouped, alone])
    assert [g["targets"] for g in groups] == [["10.1.2.3:9465"], ["10.1.2.3:9466"]]
    assert groups[0]["labels"] == {
        "service": "meshserve-indexer", "model": "index", "version": "3", "role": "indexer",
        "shard": "day-0,day-2", "embedder_version": "7", "index": "catalogue",
        "instance_id": "meshserve-indexer-10.1.2.3-50051-day-0,meshserve-indexer-10.1.2.3-50051-day-2"}  # fmt: skip
    assert groups[1] == target_group(alone)


def test_compose_prometheus_mounts_the_consul_config_and_the_rules_it_names() -> None:
    compose = yaml.safe_load((REPO / "deploy" / "docker-compose.yml").read_text())
    prometheus = compose["services"]["prometheus"]
    mounts = dict(v.rsplit(":", 1)[0].split(":", 1) for v in prometheus["volumes"])
    for source in mounts:
        assert (REPO / "deploy" / source).exists(), source
    config_file = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert mounts["./prometheus/prometheus-consul.yml"] == config_file
    consul = yaml.safe_load((PROMETHEUS / "prometheus-consul.yml").read_text())
    (rules_glob,) = consul["rule_files"]  # relative to the config file's directory
    assert str(Path(config_file).parent / rules_glob).startswith(mounts["./prometheus/rules"])
    assert consul["scrape_configs"][0]["consul_sd_configs"][0]["server"] == "consul:8500"
