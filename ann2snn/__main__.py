"""`python -m ann2snn`: the command line."""
import sys

from ann2snn.cli.main import main

sys.exit(main())
