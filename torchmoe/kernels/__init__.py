"""Triton kernels, each with a plain-torch reference that the tests compare against."""
