"""`python -m ann2snn`: the command line."""
import sys

from .cli import main

sys.exit(main())
