"""`python -m hf_clipneg.cli ...` runs the `hf-clipneg` console script."""

import sys

from . import main

sys.exit(main())
