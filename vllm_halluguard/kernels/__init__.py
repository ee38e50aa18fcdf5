"""Attention kernels: a torch reference and Triton implementations with the same contracts."""
