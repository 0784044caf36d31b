"""GPU metrics for Kubernetes pods: a node agent exporting NVML readings labelled by pod."""
