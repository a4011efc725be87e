"""Choosing where a request goes and whether it may go now: policies, prefix keys, admission, retry budget."""
