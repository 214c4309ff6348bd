"""`python -m mailnode` is `mailnode`."""

import sys

from mailnode.cli import main

sys.exit(main())
