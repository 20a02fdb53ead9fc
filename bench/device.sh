#!/usr/bin/env bash
# One call on a lent GPU machine, which keeps nothing between calls: lay out the competition from
# the carried archives, then run the given command. Here, before the call:
#   mkdir -p .carry && cp ../shared/cifar10/{build_input.py,train.tar.xz,test.tar.xz} .carry/
# and the call (device tool, carry [".carry"]):
#   bash bench/device.sh python3 bench/bench.py --input input
set -euo pipefail
export TQDM_MININTERVAL=15  # progress bars every 15 s: the call returns only the last 12,000 characters
if [ ! -f input/trainLabels.csv ]; then
    python3 .carry/build_input.py --out input >&2
fi
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv >&2 || true
exec "$@"
