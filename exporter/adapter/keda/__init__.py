"""KEDA's external scaler protocol, served from the adapter's provider (trigger, scaler, server)."""
