#!/usr/bin/env bash
# Offline checks of manifests/: every kustomization builds with `kubectl kustomize`, and every
# object it renders validates, strictly (no unknown fields), against the Kubernetes 1.32
# OpenAPI schemas that the kubernetes-validate package bundles; the Istio injection template
# holds the same containers and volumes as the kustomize component and validates as a Pod;
# create-remote-secret.sh, run against a stand-in kubectl, writes a valid Secret whose
# kubeconfig kubectl can read; RBAC and security contexts keep to least privilege. Nothing
# here touches a network or a cluster.
#
#   pip install kubernetes-validate   (.ci/run does)
#   manifests/check.sh
set -euo pipefail
cd "$(dirname "$0")"

k8s_version=1.32.0
python="${PYTHON:-python3}"
command -v kubectl >/dev/null || { echo "check.sh: kubectl is needed (kubectl kustomize)" >&2; exit 1; }
"$python" -c 'import kubernetes_validate, yaml' 2>/dev/null || {
  echo "check.sh: the kubernetes-validate Python package is needed: pip install kubernetes-validate" >&2
  exit 1
}

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0

# Fails on any error, and on a warning too: a kind without a schema was not checked at all.
validate() { # FILE...
  local out
  if ! out="$("$python" -m kubernetes_validate -k "$k8s_version" --strict --quiet "$@" 2>&1)" || [ -n "$out" ]; then
    echo "$out" >&2
    return 1
  fi
}

n=0
while IFS= read -r kustomization; do
  dir="$(dirname "$kustomization")"
  # A Component only builds inside a kustomization that uses it (the examples do).
  if grep -q '^kind: Component' "$kustomization"; then
    continue
  fi
  n=$((n + 1))
  rendered="$work/$n.yaml"
  if ! kubectl kustomize "$dir" >"$rendered"; then
    echo "FAIL $dir: kubectl kustomize" >&2
    failed=1
  elif ! validate "$rendered"; then
    echo "FAIL $dir: schema validation" >&2
    failed=1
  else
    echo "ok   $dir ($(grep -c '^kind:' "$rendered") objects)"
  fi
done < <(find . -name kustomization.yaml | sort)

# The injection template against the component, and as a Pod against the schema.
"$python" - "$work/template-pod.yaml" <<'PY' || failed=1
import sys, yaml
with open("istio/meshdns-injection.yaml") as f:
    operator = yaml.safe_load(f)
template = yaml.safe_load(operator["spec"]["values"]["sidecarInjectorWebhook"]["templates"]["meshdns"])
with open("sidecar/deployment-patch.yaml") as f:
    component = yaml.safe_load(f)["spec"]["template"]["spec"]
for key in ("initContainers", "volumes"):
    if template["spec"].get(key) != component.get(key):
        sys.exit(f"FAIL istio/meshdns-injection.yaml: spec.{key} differs from sidecar/deployment-patch.yaml")
pod = {
    "apiVersion": "v1",
    "kind": "Pod",
    "metadata": {"name": "injected", "namespace": "sleep"},
    "spec": dict(template["spec"], containers=[{"name": "app", "image": "app:1"}]),
}
with open(sys.argv[1], "w") as f:
    yaml.safe_dump(pod, f)
print("ok   istio/meshdns-injection.yaml (same containers as the component)")
PY
if [ -f "$work/template-pod.yaml" ] && ! validate "$work/template-pod.yaml"; then
  echo "FAIL istio/meshdns-injection.yaml: the template is not a valid Pod spec" >&2
  failed=1
fi

# create-remote-secret.sh against a kubectl stand-in that knows one context, `cluster-2-ctx`.
cat >"$work/kubectl" <<'STUB'
#!/usr/bin/env bash
args="$*"
case "$args" in
  *"config view"*"--context=cluster-2-ctx"*) printf 'https://cluster-2.example.test:6443' ;;
  *"--context=cluster-2-ctx"*"get secret meshdns-reader-token"*"data.token"*)
    printf '%s' "$(printf 'eyJhbGciOiJSUzI1NiJ9.e30.c2lnbmF0dXJl' | base64 -w0)" ;;
  *"--context=cluster-2-ctx"*"get secret meshdns-reader-token"*"ca"*)
    printf 'LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCg==' ;;
  *) echo "stub kubectl: unexpected: $args" >&2; exit 1 ;;
esac
STUB
chmod +x "$work/kubectl"
secret="$work/remote-secret.yaml"
if ! KUBECTL="$work/kubectl" ./create-remote-secret.sh --namespace sleep cluster-2=cluster-2-ctx >"$secret"; then
  echo "FAIL create-remote-secret.sh" >&2
  failed=1
elif ! validate "$secret"; then
  echo "FAIL create-remote-secret.sh: the Secret does not validate" >&2
  failed=1
else
  "$python" - "$secret" "$work/kubeconfig" <<'PY' || failed=1
import sys, yaml
with open(sys.argv[1]) as f:
    secret = yaml.safe_load(f)
assert secret["metadata"]["labels"]["istio/multiCluster"] == "true", secret["metadata"]
assert list(secret["stringData"]) == ["cluster-2"], list(secret["stringData"])
with open(sys.argv[2], "w") as f:
    f.write(secret["stringData"]["cluster-2"])
PY
  server="$(kubectl config view --kubeconfig "$work/kubeconfig" -o 'jsonpath={.clusters[0].cluster.server}')"
  if [ "$server" != "https://cluster-2.example.test:6443" ]; then
    echo "FAIL create-remote-secret.sh: kubeconfig server is '$server'" >&2
    failed=1
  else
    echo "ok   create-remote-secret.sh (Secret and kubeconfig)"
  fi
fi
# A context that fails: nothing on stdout, so `| kubectl apply -f -` applies nothing.
if out="$(KUBECTL="$work/kubectl" ./create-remote-secret.sh other=unknown-ctx 2>/dev/null)" || [ -n "$out" ]; then
  echo "FAIL create-remote-secret.sh: a failing context must print nothing and exit non-zero" >&2
  failed=1
fi

# Least privilege, over everything rendered above and the injection template: RBAC only reads
# Services and EndpointSlices (never Secrets: remote kubeconfigs come as a mounted volume); the
# meshdns container runs as non-root with a read-only root filesystem and no capabilities; the
# iptables init container adds NET_ADMIN and NET_RAW and nothing else.
"$python" - "$work"/*.yaml <<'PY' || failed=1
import sys, yaml
problems, pods = [], 0
allowed = {("", "services"), ("discovery.k8s.io", "endpointslices")}
def pod_specs(obj):
    spec = obj.get("spec") or {}
    if obj.get("kind") == "Pod":
        yield spec
    elif isinstance(spec.get("template"), dict):
        yield spec["template"].get("spec") or {}
for path in sys.argv[1:]:
    with open(path) as f:
        for obj in yaml.safe_load_all(f):
            if not isinstance(obj, dict):
                continue
            name = f"{path.rsplit('/', 1)[-1]}: {obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
            if obj.get("kind") in ("ClusterRole", "Role"):
                for rule in obj.get("rules") or []:
                    verbs = set(rule.get("verbs") or [])
                    if not verbs <= {"get", "list", "watch"}:
                        problems.append(f"{name}: verbs {sorted(verbs)} are more than get/list/watch")
                    for group in rule.get("apiGroups") or [""]:
                        for resource in rule.get("resources") or []:
                            if (group, resource) not in allowed:
                                problems.append(f"{name}: reads {group or 'core'}/{resource}")
            for spec in pod_specs(obj):
                for c in (spec.get("containers") or []) + (spec.get("initContainers") or []):
                    if not str(c.get("name", "")).startswith("meshdns"):
                        continue
                    pods += 1
                    sc = c.get("securityContext") or {}
                    caps = sc.get("capabilities") or {}
                    if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
                        problems.append(f"{name}: {c['name']} needs readOnlyRootFilesystem and no privilege escalation")
                    if "ALL" not in (caps.get("drop") or []):
                        problems.append(f"{name}: {c['name']} does not drop all capabilities")
                    added = set(caps.get("add") or [])
                    if c in (spec.get("initContainers") or []):
                        if not added <= {"NET_ADMIN", "NET_RAW"}:
                            problems.append(f"{name}: init container {c['name']} adds {sorted(added)}")
                    elif added or sc.get("runAsNonRoot") is not True or sc.get("privileged"):
                        problems.append(f"{name}: {c['name']} must run as non-root without capabilities")
if problems or not pods:
    print("\n".join(problems) or "no meshdns container found", file=sys.stderr)
    sys.exit(1)
print(f"ok   least privilege ({pods} meshdns containers, RBAC read-only on services and endpointslices)")
PY

if [ "$failed" -ne 0 ]; then
  echo "manifest checks failed" >&2
  exit 1
fi
echo "manifest checks passed"
