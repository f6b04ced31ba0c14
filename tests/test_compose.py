"""compose.yaml and the Dockerfile are validated without a Docker engine: structure,
references, and that every command they run exists in this repo."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent

def load() -> dict[str, Any]:
    data = yaml.safe_load((REPO / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data

def test_services_and_dependencies() -> None:
    services = load()["services"]
    assert {"redis", "gateway", "classifier", "controller", "worker", "tasks"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond["condition"] == "service_healthy"
            assert "healthcheck" in services[dep], f"{dep} has no healthcheck"
        if name != "redis":
            assert svc["build"] == "." and svc["environment"]["T2I_REDIS_URL"].startswith(
                "redis://redis:")
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]

def test_every_command_exists() -> None:
    for name, svc in load()["services"].items():
        if name == "redis":
            continue
        cmds = [svc["command"]]
        hc = svc.get("healthcheck", {}).get("test")
        if hc and hc[1] == "python":
            cmds.append(hc[1:])
        for cmd in cmds:
            assert cmd[:2] == ["python", "-m"], cmd
            module = cmd[2]
            spec = importlib.util.find_spec(module + ".__main__")
            assert spec is not None, f"{name}: {module} has no __main__"
            if "--check" in cmd:
                # The flag is accepted (exit 0 or 1 depending on liveness, not 2 = usage).
                res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                                     capture_output=True, text=True, timeout=60)
                assert res.returncode == 0 and "--check" in res.stdout, (module, res.stderr)

def test_env_vars_are_settings() -> None:
    """Every T2I_* variable set in compose names a real settings field."""
    from common import settings as s

    fields: set[str] = set()
    for cls in (s.GatewaySettings, s.ClassifierSettings, s.ControllerSettings,
                s.WorkerSettings, s.TaskSettings):
        fields |= {f"T2I_{f.upper()}" for f in cls.model_fields}
    for svc in load()["services"].values():
        for var in svc.get("environment") or {}:
            if var.startswith("T2I_"):
                assert var in fields, var

def test_dockerfile_copies_what_it_runs() -> None:
    text = (REPO / "Dockerfile").read_text()
    copied = {src for line in re.findall(r"^COPY (.+)$", text, re.M)
              for src in line.split()[:-1]}
    for pkg in ("common", "services", "profiles", "requirements.txt", "constraints.txt"):
        assert pkg in copied
    assert "-c constraints.txt" in text
