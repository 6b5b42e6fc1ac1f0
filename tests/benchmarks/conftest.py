"""The benchmark scripts import `results_io` by name, as they do when run as ``python benchmarks/<script>.py``."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))
