#!/usr/bin/env bash
# End-to-end check on a kind cluster, for machines with Docker (not run in this
# repository's CI, which has no Docker engine; see ../README.md).
#
#   kind-tests/kind/run.sh            # create the cluster, build and load images, install, check
#   KEEP=1 kind-tests/kind/run.sh     # leave the cluster running afterwards
#
# Steps: create the two-zone cluster of cluster.yaml; build the operator, sidecar and
# ferryctl images from the repository's Dockerfiles and load them into kind; install the
# chart (CRDs, operator, webhook, the mesh's etcd); apply every example under examples/
# into a namespace of its own and wait until each object is Ready; then run the quickstart
# in real pods: a `billing` pod per zone and a `producer` pod, each with an injected
# sidecar, and check that the five orders reach `billing-a` (the producer's zone).
#
# The Rust suite (`cargo test -p ferry-kind-tests --test e2e`) runs its pods as network
# namespaces next to a local control plane; it does not drive a remote cluster.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

cluster=ferry-e2e
tag=e2e
export KUBECONFIG=${KUBECONFIG_OUT:-$PWD/target/kind-ferry-e2e.kubeconfig}
for tool in docker kind kubectl helm; do
	command -v "$tool" >/dev/null || { echo "run.sh needs $tool on PATH" >&2; exit 1; }
done

cleanup() { [[ -n ${KEEP:-} ]] || kind delete cluster --name "$cluster"; }
kind create cluster --config kind-tests/kind/cluster.yaml --kubeconfig "$KUBECONFIG"
trap cleanup EXIT

for image in operator sidecar ferryctl; do
	name=ferry-$image
	[[ $image == ferryctl ]] && name=ferryctl
	docker build -f "$image/Dockerfile" -t "ghcr.io/ferry-dev/$name:$tag" .
	kind load docker-image --name "$cluster" "ghcr.io/ferry-dev/$name:$tag"
done

helm install ferry charts/ferry --namespace ferry-system --create-namespace --wait \
	--set image.tag=$tag --set sidecar.image.tag=$tag

# Every example: applied in its own namespace, every object Ready.
for dir in examples/*/; do
	example=$(basename "$dir")
	ns=ex-$example
	kubectl create namespace "$ns"
	for file in "$dir"*.yaml; do
		grep -q '^kind:' "$file" || continue # pods.yaml lists local pods, not objects
		sed "s/namespace: default/namespace: $ns/" "$file" | kubectl apply -n "$ns" -f -
	done
	kubectl wait --for=condition=Ready --timeout=120s -n "$ns" --all \
		topics.ferry.dev,consumergroups.ferry.dev,subscriptions.ferry.dev
done

# The quickstart in real pods: the app container is ferryctl itself.
ns=ex-quickstart
pod() { # name zone labels args...
	local name=$1 zone=$2 labels=$3
	shift 3
	local args
	args=$(printf '"%s",' "$@")
	kubectl apply -n "$ns" -f - <<YAML
apiVersion: v1
kind: Pod
metadata:
  name: $name
  labels: {$labels}
  annotations: {ferry.dev/inject: "true"}
spec:
  restartPolicy: OnFailure
  nodeSelector: {topology.kubernetes.io/zone: $zone}
  containers:
    - name: app
      image: ghcr.io/ferry-dev/ferryctl:$tag
      args: [${args%,}]
YAML
}
for zone in a b; do
	pod "billing-$zone" "zone-$zone" "app: billing" \
		consume --to 127.0.0.1:7700 "$ns/billing-orders" --count 5
done
kubectl wait --for=condition=Ready --timeout=120s -n "$ns" pod/billing-a pod/billing-b
pod producer zone-a "role: producer" \
	publish --to 127.0.0.1:7700 "$ns/orders" 'order {i}' --count 5
kubectl wait --for=jsonpath='{.status.containerStatuses[0].state.terminated.reason}'=Completed \
	--timeout=180s -n "$ns" pod/billing-a
got=$(kubectl logs -n "$ns" billing-a -c app | grep -c 'delivery')
echo "billing-a received $got deliveries"
[[ $got == 5 ]]
echo "kind end-to-end check passed"
