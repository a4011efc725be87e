"""The gateway's own HTTP/1.1 server protocol (protocol.py), its request cycles (cycle.py) and the one-timer
deadlines both it and the upstream client use (deadline.py)."""
