"""A user's script for `launch.py run`: prints its argv, exits with EXIT_CODE, fails on FAIL_RANK."""

import json
import os
import sys

print("ARGV", json.dumps(sys.argv[1:]), "RANK", os.environ.get("RANK"), "NAME", __name__, flush=True)
if os.environ.get("FAIL_RANK") == os.environ.get("RANK", "0"):
    raise ValueError("bad value in the user's script")
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
