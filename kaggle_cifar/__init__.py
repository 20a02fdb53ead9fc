"""From the Kaggle CIFAR-10 download to a submission: k-fold training, TTA fold ensemble, CSV."""

import atexit
import gc
import logging
import os
import sys
import warnings

# OpenMP threads that finish their share of an op spin while they wait for the next one. Beside
# another busy process (a test run, a second job) the spinning takes the cores the other one needs:
# on 2 cores training ran 1.6-1.7x slower than with passive waiting, which costs 12-26% on an idle
# machine (bench/RESULTS.md; OMP_WAIT_POLICY=ACTIVE for a machine of your own). It must be set
# before torch loads OpenMP; a value already set wins.
TORCH_LOADED_FIRST = "torch was imported before kaggle_cifar"
if "torch" in sys.modules and "OMP_WAIT_POLICY" not in os.environ:
    warnings.warn(f"{TORCH_LOADED_FIRST}, so OpenMP keeps its spinning wait policy: import kaggle_cifar first, "
                  "or set OMP_WAIT_POLICY", stacklevel=2)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Compiling on a machine without a CUDA runtime, torch warns once that it guesses CUDA_HOME: a line
# about a GPU toolkit in the middle of a CPU run's progress, and nothing the CPU kernels use.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

# At exit the interpreter's garbage collections walk every object torch and its compilers made:
# over a second after a script's work is done (bench/RESULTS.md). Nothing then needs them: exit
# handlers have run and files are closed by their `with` blocks. Frozen, they are not walked.
atexit.register(gc.freeze)
