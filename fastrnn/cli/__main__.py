"""python -m fastrnn.cli: the same as the fastrnn command."""
import sys

from . import main

sys.exit(main())
