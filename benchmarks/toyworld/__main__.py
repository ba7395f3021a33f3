"""`python -m benchmarks.toyworld`: run (or finish) the convergence study."""

import sys

from benchmarks.toyworld.study import main

sys.exit(main())
