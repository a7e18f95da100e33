"""Triton kernels of fastkd, installed as `fastkd.kernels` (never as a top-level `kernels`).

Kernels only: no autograd and no argument checking; `fastkd.autograd` launches them.
"""
