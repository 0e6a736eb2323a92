"""`python -m pmrl_kernels.bench`."""
import sys

from .cli import main

sys.exit(main())
