"""Memory: the per-rank monitor, the leak detector and its verdicts, the GPU preflight, and the
host that runs a user's own script under the monitor (run, memcheck)."""
