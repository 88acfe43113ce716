#!/usr/bin/env python3
"""Validates the deployment examples: the Kubernetes manifests against the API schemas
(kubernetes-validate, strict: no unknown fields), every proxy.toml they carry (and the
compose rig's) with the proxy's own `check`, and the compose file's services.

    python3 deploy/validate.py target/debug/mosaic-auth-proxy

Exit status 0: all valid; 1: a problem (printed); 77: kubernetes-validate is not installed
(pip install kubernetes-validate).
"""
import os
import pathlib
import subprocess
import sys
import tempfile
import tomllib

HERE = pathlib.Path(__file__).resolve().parent
KUBERNETES_VERSION = "1.30.0"


def fail(message):
    print(f"invalid: {message}", file=sys.stderr)
    sys.exit(1)


def check_config(binary, name, text):
    """Runs `check` on a proxy.toml, its secret files and variables stood in for."""
    config = tomllib.loads(text)
    env = dict(os.environ)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        for account, table in config.get("accounts", {}).items():
            if "client_secret_file" in table:
                secret = tmp / f"{account}.secret"
                secret.write_text("stand-in")
                key = f"MOSAIC_AUTH_PROXY__ACCOUNTS__{account.upper()}__CLIENT_SECRET_FILE"
                env[key] = str(secret)
            if "client_secret_env" in table:
                env[table["client_secret_env"]] = "stand-in"
        path = tmp / "proxy.toml"
        path.write_text(text)
        out = subprocess.run([binary, "check", "--config", str(path)], env=env,
                             capture_output=True, text=True)
        if out.returncode != 0:
            fail(f"{name}: check refused it:\n{out.stderr}")
        print(f"ok: {name}: {out.stdout.strip()}")


def main():
    if len(sys.argv) != 2:
        fail("usage: validate.py PATH-TO-mosaic-auth-proxy")
    binary = sys.argv[1]
    try:
        import yaml
        import kubernetes_validate  # noqa: F401
    except ImportError:
        print("kubernetes-validate is not installed: pip install kubernetes-validate",
              file=sys.stderr)
        sys.exit(77)

    manifests = sorted((HERE / "kubernetes").glob("*.yaml"))
    if not manifests:
        fail("no manifests under deploy/kubernetes")
    out = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", "--no-warn",
                          "-k", KUBERNETES_VERSION, *map(str, manifests)],
                         capture_output=True, text=True)
    print(out.stdout + out.stderr, end="")
    if out.returncode != 0:
        fail("kubernetes-validate refused a manifest")

    kinds = set()
    for manifest in manifests:
        for doc in yaml.safe_load_all(manifest.read_text()):
            kinds.add(doc["kind"])
            if doc["kind"] == "ConfigMap" and "proxy.toml" in doc.get("data", {}):
                check_config(binary, f"{manifest.name}: {doc['metadata']['name']}",
                             doc["data"]["proxy.toml"])
            if doc["kind"] == "Deployment":
                for c in doc["spec"]["template"]["spec"]["containers"]:
                    if c["name"] != "mosaic-auth-proxy":
                        continue
                    paths = {c[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
                    if paths != {"/livez", "/readyz"}:
                        fail(f"{manifest.name}: probes are {paths}")
                    if "requests" not in c.get("resources", {}):
                        fail(f"{manifest.name}: no resource requests")
    if "PodDisruptionBudget" not in kinds:
        fail("the gateway has no PodDisruptionBudget")

    compose = yaml.safe_load((HERE / "compose" / "compose.yaml").read_text())
    services = compose.get("services", {})
    for name in ("identity", "upstream", "proxy"):
        if name not in services:
            fail(f"compose.yaml has no service {name}")
    commands = {name: services[name]["command"] for name in services}
    if commands["identity"][0] != "identity-stub" or commands["upstream"][0] != "upstream-stub":
        fail("compose.yaml: the stand-ins must run identity-stub and upstream-stub")
    check_config(binary, "compose/proxy.toml", (HERE / "compose" / "proxy.toml").read_text())
    print("ok: compose.yaml has the identity, upstream and proxy services")


if __name__ == "__main__":
    main()
