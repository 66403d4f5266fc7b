"""Records the CUDA variables at the moment ``torch`` is first imported in a process.

Put this folder on PYTHONPATH with TORCH_IMPORT_PROBE=<file>: each process appends one
JSON line {pid, CUDA_DEVICE_ORDER, CUDA_VISIBLE_DEVICES} when it starts importing torch.
This is how the tests prove launch.py applies --gpus before torch loads.
"""

import json
import os
import sys


class _Probe:
    done = False

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not _Probe.done:
            _Probe.done = True
            with open(os.environ["TORCH_IMPORT_PROBE"], "a") as fh:
                fh.write(
                    json.dumps(
                        {
                            "pid": os.getpid(),
                            "CUDA_DEVICE_ORDER": os.environ.get("CUDA_DEVICE_ORDER"),
                            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
                        }
                    )
                    + "\n"
                )
        return None


if os.environ.get("TORCH_IMPORT_PROBE"):
    sys.meta_path.insert(0, _Probe())
