"""The data plane: one request from the client's bytes to a backend and its answer back (the hot path)."""
