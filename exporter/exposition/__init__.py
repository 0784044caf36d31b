"""Expose: the collector that rebuilds every family from a snapshot, the text rendering, and the
HTTP server that sends those bytes."""
