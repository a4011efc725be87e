"""`python -m worker`: the vLLM worker launcher (the worker image's entrypoint)."""

import sys

from worker.launcher import main

sys.exit(main())
