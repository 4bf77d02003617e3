"""Adapters of the qeq-unroll core: the ASE calculator and the command line."""

from .qeq import QEqCalculator

__all__ = ["QEqCalculator"]
