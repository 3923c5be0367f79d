"""How the stages' fan-outs run: the local executor, the Ray executor, the stall watchdog and device resolution."""
