"""Read: each outside system owned by one module that turns it into plain data (exporter.model):
NVML, the kubelet's pod-resources API, /proc, and the Kubernetes API (pods, ResourceSlices)."""
