"""The surrogate of the teacher: networks, the fit loop, prediction kernels, MIPS, metrics, the candidate estimates and item views."""
