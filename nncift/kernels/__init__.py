"""The estimated kernels: the block / stripe store and the estimate worker."""
