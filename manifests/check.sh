#!/usr/bin/env bash
# Offline checks of manifests/: every kustomization builds with `kubectl kustomize`, and every
# object it renders validates, strictly (no unknown fields), against the Kubernetes 1.32
# OpenAPI schemas that the kubernetes-validate package bundles; the Istio injection template
# holds the same containers and volumes as the kustomize component and validates as a Pod;
# create-remote-secret.sh, run against a stand-in kubectl, writes a valid Secret whose
# kubeconfig kubectl can read. Nothing here touches a network or a cluster.
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

if [ "$failed" -ne 0 ]; then
  echo "manifest checks failed" >&2
  exit 1
fi
echo "manifest checks passed"
