"""The HPA adapter: serves the agent's GPU metrics through the custom and external metrics APIs."""
