"""The torchrun baseline for ``launch.py bench launch``: join, first barrier, leave.

Deliberately the least a torchrun script can do, so the comparison charges launch.py
for everything it adds (config, device plan, context, logging, run directory).
"""

import torch.distributed as dist

if __name__ == "__main__":
    dist.init_process_group("gloo")
    dist.barrier()
    dist.destroy_process_group()
