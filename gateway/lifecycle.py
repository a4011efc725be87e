"""Process lifecycle flags shared by the server loop and the routes."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Lifecycle:
    draining: bool = False  # SIGTERM received: /ready answers 503 while in-flight requests finish
