"""Subset selection: dense and sparse greedy (FL, FLMI, FLCG, top-k) and selection fidelity."""
