"""The deployment files under deploy/: checked for what they promise, for agreement with each other and with the
code, and by their own tools where those are installed (docker compose / docker-compose, hadolint, shellcheck,
systemd-analyze): a missing tool skips its test with the reason. The broker config itself runs on a real
Mosquitto in tests/integration/test_deploy_broker.py.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from edge_agent import cli as edge_cli
from enrollment_server.config import load_config as load_server_config
from models.contract import limits

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MOSQUITTO_CONF = DEPLOY / "mosquitto" / "mosquitto.conf"
COMPOSE = DEPLOY / "central" / "compose.yaml"
COMPOSE_PG = DEPLOY / "central" / "compose.postgres.yaml"
DOCKERFILES = [DEPLOY / "central" / "Dockerfile", DEPLOY / "jetson" / "Dockerfile"]
SCRIPTS = [
    DEPLOY / "mosquitto" / "make-certs.sh",
    DEPLOY / "central" / "init-site.sh",
    DEPLOY / "jetson" / "install.sh",
]
UNITS = [DEPLOY / "jetson" / "faceattend-edge.service", DEPLOY / "jetson" / "faceattend-edge-container.service"]


def tool(name: str) -> str:
    """A validator from $FACEATTEND_<NAME> or PATH, else skip."""
    path = os.environ.get(f"FACEATTEND_{name.upper().replace('-', '_')}") or shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed")
    return path


# --- mosquitto.conf -----------------------------------------------------------------------------------------------


def mosquitto_sections() -> tuple[dict[str, list[str]], dict[str, dict[str, list[str]]]]:
    """(global directives, {listener port: its directives}); each directive maps to its values in order."""
    glob: dict[str, list[str]] = {}
    listeners: dict[str, dict[str, list[str]]] = {}
    current = glob
    for raw in MOSQUITTO_CONF.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition(" ")
        if key == "listener":
            current = listeners.setdefault(value.split()[0], {})
            continue
        # per_listener_settings false: security and limits are global wherever written; TLS settings are per listener
        target = current if key in _PER_LISTENER else glob
        target.setdefault(key, []).append(value.strip())
    return glob, listeners


_PER_LISTENER = {
    "protocol",
    "cafile",
    "certfile",
    "keyfile",
    "tls_version",
    "require_certificate",
    "use_identity_as_username",
    "use_username_as_clientid",
    "max_connections",
}


def test_mosquitto_has_tls_listeners_only_and_no_anonymous_access():
    glob, listeners = mosquitto_sections()
    assert sorted(listeners) == ["8883", "8884"]
    for port, opts in listeners.items():
        for key in ("cafile", "certfile", "keyfile"):
            assert opts.get(key), f"listener {port} without {key}: it would be plain TCP"
        assert opts["tls_version"] == ["tlsv1.2"]
    assert listeners["8883"]["use_username_as_clientid"] == ["true"]
    assert listeners["8884"]["require_certificate"] == ["true"]
    assert listeners["8884"]["use_identity_as_username"] == ["true"]
    assert glob["per_listener_settings"] == ["false"] and glob["allow_anonymous"] == ["false"]
    assert glob["password_file"] == ["/mosquitto/auth/passwords"] and glob["acl_file"] == ["/mosquitto/auth/acl"]


def test_mosquitto_limits_fit_the_wire_contract():
    glob, _ = mosquitto_sections()
    max_packet = int(glob["max_packet_size"][0])
    # a full gallery chunk plus topic, header and MQTT 5 properties must pass; nothing much larger should
    assert limits.MAX_CHUNK_SIZE + 4 * limits.KIB <= max_packet <= 4 * limits.MAX_CHUNK_SIZE
    assert max_packet > limits.MAX_MANIFEST_BYTES
    assert int(glob["max_inflight_messages"][0]) >= 1
    # the server's queued events over an outage (enrollment_server/ingest.py): far above Mosquitto's 1000
    assert int(glob["max_queued_messages"][0]) >= 100_000
    assert glob["persistence"] == ["true"] and glob["persistence_location"] == ["/mosquitto/data/"]
    assert "persistent_client_expiration" in glob


# --- compose ------------------------------------------------------------------------------------------------------


def _expand(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR:-default} / ${VAR} interpolation, enough for our files."""

    def sub(m: re.Match) -> str:
        name, default = m.group(1), m.group(3)
        return env.get(name) or (default if default is not None else "")

    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(:-([^}]*))?\}", sub, text)


def compose(env: dict[str, str] | None = None) -> dict:
    return yaml.safe_load(_expand(COMPOSE.read_text(), env or {}))


def test_compose_services_mounts_and_secrets_agree_with_the_broker_and_server_configs():
    c = compose({"FACEATTEND_HOME": "/srv/site"})
    assert set(c["services"]) == {"mosquitto", "server"}
    broker, server = c["services"]["mosquitto"], c["services"]["server"]
    assert broker["image"].startswith("eclipse-mosquitto:2.")
    # only the edges' TLS listener is published; the server's listener stays on the compose network
    assert broker["ports"] == ["8883:8883"]
    assert all(not p.startswith(("8884", "1883")) for p in broker["ports"])
    assert server["ports"] == ["127.0.0.1:8080:8080"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in broker["volumes"]}
    assert (COMPOSE.parent / mounts["/mosquitto/config/mosquitto.conf"]).resolve() == MOSQUITTO_CONF
    conf = MOSQUITTO_CONF.read_text()
    for target in ("/mosquitto/certs", "/mosquitto/auth", "/mosquitto/data"):
        assert target in mounts and target + "/" in conf
    assert mounts["/mosquitto/data"] == "broker-data"
    # the server: its config is a secret, its state on named volumes, its paths those of server.yaml.example
    assert server["secrets"] == [{"source": "server_config", "target": "server.yaml"}]
    assert c["secrets"]["server_config"]["file"] == "/srv/site/server.yaml"
    smounts = {v.split(":")[1]: v.split(":")[0] for v in server["volumes"]}
    example = (DEPLOY / "central" / "server.yaml.example").read_text()
    cfg = load_server_config_text(example)
    assert Path(smounts["/etc/faceattend/tls"]).name == "server-certs"
    assert cfg.mqtt.ca_file.parent == cfg.mqtt.cert_file.parent == Path("/etc/faceattend/tls")
    assert smounts["/var/lib/faceattend/keys"] == "server-keys"
    assert cfg.gallery.signing_key.parent == Path("/var/lib/faceattend/keys")
    assert smounts["/var/lib/faceattend/db"] == "server-db"
    assert Path(cfg.database.url).parent == Path("/var/lib/faceattend/db")
    assert cfg.mqtt.url == "mqtts://mosquitto:8884" and cfg.api.host == "0.0.0.0"
    dockerfile = (DEPLOY / "central" / "Dockerfile").read_text()
    assert (
        "FACEATTEND_BROKER_AUTH=/etc/faceattend/broker-auth" in dockerfile and "/etc/faceattend/broker-auth" in smounts
    )
    assert "FACEATTEND_PROVISION_OUT=/var/lib/faceattend/provisioned" in dockerfile
    assert '"-c", "/run/secrets/server.yaml"' in dockerfile
    assert set(c["volumes"]) == {"server-db", "server-keys", "broker-data"}
    # no secret travels through the environment (it would show in `docker inspect`)
    for service in c["services"].values():
        for name in service.get("environment", {}):
            assert not re.search(r"PASSWORD|TOKEN|SECRET|KEY", name) or name.endswith("_FILE"), name


def load_server_config_text(text: str):
    import tempfile

    values = {"@SITE@": "hq", "@DATABASE_URL@": "/var/lib/faceattend/db/faceattend.db", "@ADMIN_TOKEN@": "t" * 64}
    for k, v in values.items():
        text = text.replace(k, v)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "server.yaml"
        path.write_text(text)
        return load_server_config(path)


def test_the_postgres_override_adds_the_database_with_a_file_secret():
    c = yaml.safe_load(_expand(COMPOSE_PG.read_text(), {}))
    pg = c["services"]["postgres"]
    assert pg["environment"]["POSTGRES_PASSWORD_FILE"] == "/run/secrets/postgres_password"
    assert "POSTGRES_PASSWORD" not in pg["environment"]
    assert c["services"]["server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "ports" not in pg  # reachable from the server only


def _compose_cmd() -> list[str]:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    return [tool("docker-compose")]


def test_compose_files_validate_with_docker_compose(tmp_path):
    cmd = _compose_cmd()
    (tmp_path / "server.yaml").write_text("site: hq\n")
    (tmp_path / "postgres.password").write_text("x\n")
    env = {**os.environ, "FACEATTEND_HOME": str(tmp_path), "COMPOSE_PROJECT_NAME": "faceattend"}
    for files in ([COMPOSE], [COMPOSE, COMPOSE_PG]):
        args = [a for f in files for a in ("-f", str(f))]
        done = subprocess.run([*cmd, *args, "config"], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        rendered = yaml.safe_load(done.stdout)
        assert {"mosquitto", "server"} <= set(rendered["services"])
        assert str(tmp_path / "broker-auth") in str(rendered["services"]["mosquitto"]["volumes"])


# --- container images ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.parent.name)
def test_dockerfiles_pass_hadolint(dockerfile):
    done = subprocess.run([tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_images_run_their_commands_from_the_project():
    server = (DEPLOY / "central" / "Dockerfile").read_text()
    jetson = (DEPLOY / "jetson" / "Dockerfile").read_text()
    assert re.search(r"^USER 10001:1883$", server, re.MULTILINE)  # never root
    assert "l4t-tensorrt" in jetson and "--system-site-packages" in jetson
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'enrollment-server = "enrollment_server.cli:main"' in pyproject
    assert 'model-tool = "models.cli.model_tool:main"' in pyproject
    for name in ("models", "enrollment_server"):
        assert f"COPY {name} ./{name}" in server
    for name in ("models", "edge_agent"):
        assert f"COPY {name} ./{name}" in jetson
    assert "COPY edge_agent" not in server and "COPY enrollment_server" not in jetson  # deployables stay apart


def test_the_edge_agent_console_script_the_units_call_is_declared_and_installed():
    assert 'edge-agent = "edge_agent.cli:main"' in (REPO / "pyproject.toml").read_text()
    script = Path(sys.executable).parent / "edge-agent"
    assert script.is_file(), f"{script} is missing: the Jetson units and image call it"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "check-config" in done.stdout, done.stderr


# --- scripts ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_are_executable_and_pass_shellcheck(script):
    assert os.access(script, os.X_OK), f"{script} is not executable"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    done = subprocess.run([tool("shellcheck"), str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_init_site_lays_out_a_site_that_compose_and_the_server_accept(tmp_path):
    tool("openssl")
    home = tmp_path / "site"
    init = DEPLOY / "central" / "init-site.sh"
    done = subprocess.run(["bash", str(init), "--site", "hq", str(home), "broker.example.org"], capture_output=True)
    assert done.returncode == 0, done.stderr
    for rel in (
        "broker-certs/ca.crt",
        "broker-certs/broker.crt",
        "broker-certs/broker.key",
        "server-certs/client.crt",
        "server-certs/client.key",
        "broker-auth/acl",
        "broker-auth/passwords",
        "server.yaml",
        "compose.env",
    ):
        assert (home / rel).is_file(), rel
    assert stat.S_IMODE((home / "server.yaml").stat().st_mode) == 0o400
    for key in ("broker-certs/broker.key", "server-certs/client.key", "ca/ca.key"):
        assert stat.S_IMODE((home / key).stat().st_mode) == 0o600, key
    assert (home / "broker-auth" / "acl").read_text() == (DEPLOY / "mosquitto" / "acl").read_text()
    cfg = load_server_config(home / "server.yaml")
    assert cfg.site == "hq" and len(cfg.api.token) == 64 and cfg.mqtt.url == "mqtts://mosquitto:8884"
    env = dict(line.split("=", 1) for line in (home / "compose.env").read_text().splitlines())
    assert env["FACEATTEND_BROKER_PUBLIC_URL"] == "mqtts://broker.example.org:8883"
    assert env["FACEATTEND_HOME"] == str(home)
    # a second run keeps every secret
    before = (home / "server.yaml").read_bytes(), (home / "broker-certs" / "broker.key").read_bytes()
    assert subprocess.run(["bash", str(init), str(home), "broker.example.org"], capture_output=True).returncode == 0
    assert ((home / "server.yaml").read_bytes(), (home / "broker-certs" / "broker.key").read_bytes()) == before
    # --postgres puts the same password into server.yaml and postgres.password
    pg_home = tmp_path / "pg"
    assert subprocess.run(["bash", str(init), "--postgres", str(pg_home), "b"], capture_output=True).returncode == 0
    password = (pg_home / "postgres.password").read_text().strip()
    assert load_server_config(pg_home / "server.yaml").database.url == (
        f"postgresql+psycopg://faceattend:{password}@postgres:5432/faceattend"
    )


def test_install_sh_stages_the_bundle_with_safe_modes(tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    for name in ("edge.yaml", "mqtt.password", "ca.crt", "gallery-signing.pub.pem"):
        (bundle / name).write_text(name)
    root = tmp_path / "root"
    install = DEPLOY / "jetson" / "install.sh"
    done = subprocess.run(["bash", str(install), "--bundle", str(bundle), "--stage", str(root)], capture_output=True)
    assert done.returncode == 0, done.stderr
    etc = root / "etc" / "faceattend"
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in etc.iterdir()}
    assert modes == {"edge.yaml": 0o640, "mqtt.password": 0o640, "ca.crt": 0o644, "gallery-signing.pub.pem": 0o644}
    assert stat.S_IMODE(etc.stat().st_mode) == 0o750
    assert (root / "etc/systemd/system/faceattend-edge.service").read_bytes() == UNITS[0].read_bytes()
    assert (root / "var/lib/faceattend/cache").is_dir()
    (bundle / "mqtt.password").unlink()
    assert subprocess.run(["bash", str(install), "--bundle", str(bundle), "--stage", str(root)]).returncode == 2


# --- systemd units ------------------------------------------------------------------------------------------------


def unit(path: Path) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values.setdefault(key.strip(), []).append(value.strip())
    return values


def test_the_native_unit_builds_engines_then_runs_under_a_watchdog():
    u = unit(UNITS[0])
    assert u["Type"] == ["notify"] and u["WatchdogSec"] == ["60s"] and u["Restart"] == ["always"]
    assert u["User"] == ["faceattend"] and u["NoNewPrivileges"] == ["yes"] and u["ProtectSystem"] == ["strict"]
    assert u["ExecStartPre"] == ["-/opt/faceattend/venv/bin/edge-agent build-engines /etc/faceattend/edge.yaml"]
    assert u["ExecStart"] == ["/opt/faceattend/venv/bin/edge-agent run /etc/faceattend/edge.yaml"]
    assert u["StateDirectory"] == ["faceattend"]
    c = unit(UNITS[1])
    assert (
        c["Restart"] == ["always"]
        and "build-engines" in c["ExecStartPre"][1]
        and "--runtime nvidia" in c["ExecStart"][0]
    )


def test_the_units_use_edge_agent_commands_that_exist():
    parser = edge_cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    used = set()
    for path in UNITS:
        used |= set(re.findall(r"edge-agent(?:\"|')?\s+([a-z-]+)", path.read_text()))
        used |= set(re.findall(r"\$\{FACEATTEND_IMAGE\}\s+([a-z-]+)", path.read_text()))
    used |= set(re.findall(r"edge-agent\" ([a-z-]+)", (DEPLOY / "jetson" / "install.sh").read_text()))
    assert used and used <= commands, used - commands
    for args in (["run", "/etc/faceattend/edge.yaml"], ["build-engines", "/etc/faceattend/edge.yaml"]):
        parser.parse_args(args)


def _unit_dependencies(unit: Path) -> set[str]:
    deps = set()
    for line in unit.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() in ("Requires", "Wants", "After", "Before", "BindsTo", "PartOf", "Requisite"):
            deps.update(value.split())
    return deps


def test_units_pass_systemd_analyze_verify(tmp_path):
    analyze = tool("systemd-analyze")
    system = Path("/lib/systemd/system")
    if not (system / "sysinit.target").exists():
        pytest.skip("no systemd unit tree to verify against")
    # a root with the system's units, our units and stand-ins for the executables they name
    root = tmp_path / "root"
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    for exe in ("opt/faceattend/venv/bin/edge-agent", "usr/bin/docker"):
        path = root / exe
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    (root / "etc/systemd/system").mkdir(parents=True)
    # units ours depend on that this host may not have (docker.service where Docker is not installed): a stand-in,
    # so the verdict is about our files, not about what else the machine happens to run
    for dep in sorted({d for u in UNITS for d in _unit_dependencies(u)}):
        if not (root / "usr/lib/systemd/system" / dep).exists():
            (root / "etc/systemd/system" / dep).write_text(
                f"[Unit]\nDescription=stand-in for {dep}\n[Service]\nExecStart=/bin/true\n"
            )
    names = []
    for u in UNITS:
        shutil.copyfile(u, root / "etc/systemd/system" / u.name)
        names.append(f"/etc/systemd/system/{u.name}")
    done = subprocess.run([analyze, "verify", "--man=no", f"--root={root}", *names], capture_output=True, text=True)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr  # it warns on stderr and still exits 0
