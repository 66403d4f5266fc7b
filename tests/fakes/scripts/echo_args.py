"""A user's script for `launch.py run`: prints its argv, exits with EXIT_CODE, fails on FAIL_RANK.

BLOCK_OTHERS=1: every rank joins a gloo group; rank 0 exits with EXIT_CODE at once while the
others stay busy (a script that fails on one rank while the rest work on; a barrier would fail
as soon as rank 0's sockets close, and race rank 0's exit code to the agent).
"""

import json
import os
import sys

print("ARGV", json.dumps(sys.argv[1:]), "RANK", os.environ.get("RANK"), "NAME", __name__, flush=True)
if os.environ.get("FAIL_RANK") == os.environ.get("RANK", "0"):
    raise ValueError("bad value in the user's script")
if os.environ.get("BLOCK_OTHERS") == "1":
    import torch.distributed as dist

    dist.init_process_group("gloo")
    if dist.get_rank() != 0:
        import time

        time.sleep(120)
sys.exit(int(os.environ.get("EXIT_CODE", "0")))
