"""The adapter on a simulated cluster, to try by hand: the simulated node's agent, a real Prometheus
scraping it, a fake pods/TokenReview/SubjectAccessReview API, and the adapter over TLS on a free port.
Prints curl commands equivalent to ``kubectl get --raw`` through the API server's front proxy."""

from __future__ import annotations

import signal
import sys
import tempfile
import time
from pathlib import Path

from sim.apiserver import FakeApiServer, pod_json
from sim.certs import make_pki
from sim.node import NODE, PODS
from sim.processes import Process, free_port, start_adapter
from sim.prometheus import Prometheus


def main() -> int:
    directory = Path(tempfile.mkdtemp(prefix="adapter-demo-"))
    agent_port = free_port()
    node = Process(
        [sys.executable, "-m", "sim.node", "--listen", f"127.0.0.1:{agent_port}"], what="the node", output=None
    )
    prometheus = Prometheus(directory / "prometheus", [f"127.0.0.1:{agent_port}"], free_port())
    api = FakeApiServer().start()
    for ns, pod, uid, *_ in PODS:
        app = pod.rsplit("-", 2)[0] if pod.startswith("bert") else pod.rsplit("-", 1)[0]
        api.apply(pod_json(uid, ns, pod, NODE, labels={"app": app}))
    api.tokens["demo-token"] = ("system:serviceaccount:kube-system:horizontal-pod-autoscaler", [])
    pki = make_pki(directory)
    adapter, url = start_adapter(directory, pki, api.write_kubeconfig(directory / "kubeconfig"), prometheus.url)
    raw = f"curl -s --cacert {pki.ca} -H 'Authorization: Bearer demo-token'"
    hpa = "pods/%2A/duty_cycle_current?labelSelector=app%3Dbert-intent-detection"
    print(
        f"""
SIMULATED CLUSTER: the adapter is serving on {url} (Prometheus at {prometheus.url}).
What `kubectl get --raw PATH` returns in a cluster, try here as:
  {raw} '{url}/apis/custom.metrics.k8s.io/v1beta1'
  {raw} '{url}/apis/custom.metrics.k8s.io/v1beta2/namespaces/default/{hpa}'
  {raw} '{url}/apis/custom.metrics.k8s.io/v1beta2/namespaces/speech/metrics/duty_cycle_current'
  {raw} '{url}/apis/external.metrics.k8s.io/v1beta1/namespaces/speech/gpu_duty_cycle'
(the last through kube-apiserver only with daemonset/overlays/adapter-external, where KEDA is absent)
The adapter's own state and metrics:
  curl -s --cacert {pki.ca} '{url}/readyz?verbose'
  {raw} '{url}/metrics'
Ctrl-C stops everything.""",
        flush=True,
    )
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    try:
        while not stopping:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        adapter.stop()
        prometheus.stop()
        node.stop(signum=signal.SIGINT)
        api.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
