"""Triton kernels, installed as ``fastvae.kernels``.

The custom ops around them live in :mod:`fastvae.backends.triton_ops`.
"""
