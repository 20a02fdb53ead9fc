"""From the Kaggle CIFAR-10 download to a submission: k-fold training, TTA fold ensemble, CSV."""

import os

# OpenMP threads that finish their share of an op spin while they wait for the next one. Beside
# another busy process (a test run, a second job) the spinning takes the cores the other one needs:
# on 2 cores training ran 1.7x slower than with passive waiting, which costs about 12% on an idle
# machine (bench/RESULTS.md). It must be set before torch loads OpenMP; a value already set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
