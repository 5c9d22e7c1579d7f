"""Deployment files: deploy/validate.sh passes (and fails when a file is broken), and the Dockerfile, compose
file, Helm chart and gateway.yaml agree with the package's settings and the Makefile's pins."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from alignpro.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose.yaml"
GATEWAY_YAML = ROOT / "deploy" / "gateway.yaml"
CHART = ROOT / "deploy" / "helm" / "alignpro"
VALIDATE = ROOT / "deploy" / "validate.sh"


def _makefile_var(name: str) -> str:
    m = re.search(rf"^{name}\s*:=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, f"{name} is not set in the Makefile"
    return m.group(1).strip()


def _dockerfile_instructions(name: str) -> list[str]:
    """Arguments of every `name` instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [m.group(1).strip() for m in re.finditer(rf"^{name}\s+(.+)$", text, re.M)]


def _run_validate(root: Path, timeout: int = 900) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    # A copied tree still uses this checkout's validators and project venv.
    env.setdefault("ALIGNPRO_TOOLS_VENV", str(ROOT / ".venv-tools"))
    env.setdefault("ALIGNPRO_PYTHON", sys.executable)
    return subprocess.run(
        ["bash", str(root / "deploy" / "validate.sh")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ----- drift between the deployment files and the code --------------------------------------------------------


def test_dockerfile_port_and_healthcheck_follow_the_settings_defaults() -> None:
    port = Settings.model_fields["port"].default
    assert _dockerfile_instructions("EXPOSE") == [str(port)]
    env = " ".join(_dockerfile_instructions("ENV"))
    assert f"ALIGNPRO_PORT={port}" in env
    assert "ALIGNPRO_HOST=0.0.0.0" in env, "the server must listen beyond the container's loopback"
    [healthcheck] = _dockerfile_instructions("HEALTHCHECK")
    # The probe asks /health on ALIGNPRO_PORT, falling back to the settings' default port.
    assert "/health" in healthcheck
    assert f"os.environ.get('ALIGNPRO_PORT', '{port}')" in healthcheck
    assert "curl" not in healthcheck and "wget" not in healthcheck, "the slim image has neither"
    # Non-root, numerically, so that Kubernetes' runAsNonRoot can check it.
    [user] = _dockerfile_instructions("USER")
    uid = int(user.split(":")[0])
    assert uid != 0
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["gateway"]["podSecurityContext"]["runAsUser"] == uid
    assert values["gateway"]["service"]["port"] == port


def test_health_route_is_served_when_the_server_exists() -> None:
    sources = [p.read_text() for p in (ROOT / "src" / "alignpro" / "server").rglob("*.py")]
    routes = [s for s in sources if re.search(r"@\w+\.(get|post|api_route)\(", s)]
    if not routes:
        pytest.skip("src/alignpro/server defines no routes yet")
    joined = "\n".join(routes)
    for path in ("/health", "/ready", "/metrics"):
        assert f'"{path}"' in joined, f"the deployment files probe {path}, which the server does not define"


def test_dockerfile_installs_what_the_makefile_pins() -> None:
    run = " ".join(_dockerfile_instructions("RUN"))
    for pin in [_makefile_var("TORCH"), *_makefile_var("MODEL_PKGS").split()]:
        assert pin in run, f"Dockerfile does not install {pin} as the Makefile does"
    # The gateway variant is the base install: no extras, hence no torch.
    assert re.search(r"gateway\)\s+pip install --no-cache-dir -c constraints.txt \. ;;", run)
    # Every install takes the tested versions, as the Makefile's do.
    installs = re.findall(r"pip install [^;]*", run)
    assert installs and all("-c constraints.txt" in line for line in installs), installs


def test_the_local_image_prepares_every_model_the_default_settings_load() -> None:
    """The local image runs read-only: whatever the default settings load on first use (the embedded model, the
    merged prompter) must be prepared at build time, as `make models` does."""
    from alignpro.settings import TRAINED

    run = " ".join(_dockerfile_instructions("RUN"))
    make = (ROOT / "Makefile").read_text()
    models = {e.model for e in Settings().engines.values() if e.kind == "local"}
    assert models == {"embedded", TRAINED}, "update the commands below to what the defaults load"
    for command in ("alignpro models prepare", "alignpro models merge-prompter"):
        assert f"ALIGNPRO_HOME=/opt/alignpro HF_HUB_OFFLINE=1 {command}" in run, command
        assert f"$(VENV)/bin/{command}" in make, command


def test_constraints_pin_what_the_makefile_pins() -> None:
    """The constraint files are the exact versions the tests passed with; they must agree with the Makefile's
    own pins, or `make` would ask pip for two versions at once."""

    def pins(name: str) -> dict[str, str]:
        lines = (ROOT / name).read_text().splitlines()
        pairs = [ln.split("==") for ln in lines if ln and not ln.startswith("#")]
        assert all(len(p) == 2 for p in pairs), f"{name} holds a line that is not name==version"
        return {n.lower(): v for n, v in pairs}

    main, vllm = pins("constraints.txt"), pins("constraints-vllm.txt")
    for pin in [_makefile_var("TORCH"), *_makefile_var("MODEL_PKGS").split()]:
        name, version = pin.split("==")
        assert main.get(name) == version, f"constraints.txt pins {name}=={main.get(name)}, the Makefile {pin}"
    name, version = _makefile_var("VLLM").split("==")
    assert vllm.get(name) == version
    assert vllm.get("torch") == main["torch"], "the two environments must use the same CPU torch build"


def test_vllm_version_matches_the_one_the_tests_run() -> None:
    version = "v" + _makefile_var("VLLM").split("==")[1]
    compose = COMPOSE.read_text()
    assert f"vllm/vllm-openai:${{VLLM_VERSION:-{version}}}" in compose
    assert f"vllm-cpu-release-repo:${{VLLM_VERSION:-{version}}}" in compose
    assert yaml.safe_load((CHART / "values.yaml").read_text())["vllm"]["image"]["tag"] == version


def test_gateway_yaml_loads_and_names_what_vllm_serves(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("ALIGNPRO_")]:
        monkeypatch.delenv(var)
    settings = load_settings(GATEWAY_YAML)
    assert set(settings.engines) == {"vllm", "prompter"}
    engine = settings.engines["vllm"]
    assert all(e.kind == "openai" for e in settings.engines.values()), (
        "the gateway image has no in-process engine"
    )
    assert engine.urls == ["http://vllm:8000/v1"]
    assert settings.aliases["frozen"].prompter.mode == "off"
    aligned = settings.aliases["aligned"].prompter
    assert (aligned.mode, aligned.engine) == ("adapter", "prompter")
    assert settings.engines["prompter"].urls == ["http://prompter:8000/v1"]

    # The adapter the gateway asks for is the one compose tells vLLM to load (gpu: a LoRA module of the vLLM that
    # answers to `prompter`; cpu: the merged copy served under that name) and the chart's LoRA module.
    compose = COMPOSE.read_text()
    assert f"--lora-modules {aligned.model}=/adapters/prompter" in compose
    assert f"--served-model-name {aligned.model}" in compose
    services = yaml.safe_load(compose)["services"]
    assert "prompter" in services["vllm"]["networks"]["default"]["aliases"]
    assert "prompter" in services["prompter-cpu"]["networks"]["default"]["aliases"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert aligned.model in {m["name"] for m in values["vllm"]["lora"]["modules"]}
    chart_aliases = values["gateway"]["config"]["aliases"]
    assert chart_aliases["aligned"]["prompter"]["model"] == aligned.model

    # Compose overrides the engine's key and model through the environment; the names must hit the engine.
    for var in (
        "ALIGNPRO_ENGINES__VLLM__API_KEY",
        "ALIGNPRO_ENGINES__VLLM__MODEL",
        "ALIGNPRO_ENGINES__PROMPTER__API_KEY",
    ):
        assert f"{var}:" in compose
    monkeypatch.setenv("ALIGNPRO_ENGINES__VLLM__API_KEY", "sk-upstream")
    monkeypatch.setenv("ALIGNPRO_ENGINES__VLLM__MODEL", "org/other-model")
    overridden = load_settings(GATEWAY_YAML).engines["vllm"]
    assert overridden.api_key is not None and overridden.api_key.get_secret_value() == "sk-upstream"
    assert overridden.model == "org/other-model"
    assert overridden.urls == engine.urls, "an env override must merge into the file's engine, not replace it"


# ----- the validators -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_validate_sh_passes() -> None:
    result = _run_validate(ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert re.search(r"^all \d+ checks passed", result.stdout, re.M), result.stdout[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("path", "old", "new"),
    [
        # hadolint DL3007 (warning): a base image tagged latest.
        pytest.param(
            "Dockerfile", "FROM ${PYTHON_IMAGE} AS runtime", "FROM python:latest AS runtime", id="hadolint"
        ),
        # compose: a depends_on condition that does not exist.
        pytest.param(
            "deploy/compose.yaml", "condition: service_healthy", "condition: service_happy", id="compose"
        ),
        # Kubernetes schema (strict): a misspelt field, which a cluster would silently drop.
        pytest.param(
            "deploy/helm/alignpro/templates/gateway-pdb.yaml",
            "maxUnavailable:",
            "maxUnavailabel:",
            id="k8s-schema",
        ),
        # The gateway settings: an engine kind the settings model rejects.
        pytest.param("deploy/gateway.yaml", "kind: openai", "kind: grpc", id="settings"),
    ],
)
def test_validate_sh_fails_on_a_broken_file(tmp_path: Path, path: str, old: str, new: str) -> None:
    copy = tmp_path / "repo"
    copy.mkdir()
    shutil.copy2(DOCKERFILE, copy / "Dockerfile")
    shutil.copytree(ROOT / "deploy", copy / "deploy")
    target = copy / path
    text = target.read_text()
    assert old in text, f"{path} no longer contains {old!r}: update this test"
    target.write_text(text.replace(old, new, 1))
    result = _run_validate(copy)
    assert result.returncode != 0, f"validate.sh passed with a broken {path}:\n{result.stdout[-3000:]}"
    assert "FAILED" in result.stderr
