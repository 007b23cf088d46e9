"""Triton kernel sources, installed as ``echofast.kernels``.

This directory is mapped to the ``echofast.kernels`` package at install time (there is no
top-level ``kernels`` package). Its modules import Triton, so they are imported only lazily, by the
backends in ``echofast.ops``, when a Triton backend is actually selected.
"""
