"""Memory: the per-rank monitor, the leak detector and its verdicts, the GPU preflight, and the
runner of a user's own script under the monitor (run, memcheck: userscript.py)."""
