"""`fastrnn tune`: plans the numba backend's kernel strategies for a grid of
shapes. The command lives beside the planner it drives
(fastrnn/backends/_plan.py: its options and cmd_tune); this module adds it
to the command line.
"""
from .options import Formatter


def add_parser(sub):
    from ..backends._plan import add_tune_parser
    add_tune_parser(sub, Formatter)
