#!/usr/bin/env python3
"""Vowpal Wabbit on the same task as `cargo bench -p tandem-core --bench learner` (20,000 texts of
8-30 words, two classes, word unigrams + bigrams hashed into 2^20, AdaGrad logistic), for a side by
side throughput figure. Installs vowpalwabbit==9.11.9 into $TANDEM_HOME/pip on first use.
Usage: scripts/bench_vw.py"""
import os, random, statistics, subprocess, sys, tempfile, time

home = os.environ.get("TANDEM_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "tandem")
target = os.path.join(home, "pip", "vowpalwabbit-9.11.9")
if not os.path.exists(os.path.join(target, ".complete")):
    subprocess.check_call([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", target, "vowpalwabbit==9.11.9"])
    open(os.path.join(target, ".complete"), "w").close()
sys.path.insert(0, target)
from vowpalwabbit import pyvw  # noqa: E402

rng = random.Random(1)
words = [f"w{i:x}" for i in range(5000)]
rows = []
for _ in range(20000):
    y = rng.randrange(2)
    n = rng.randrange(8, 30)
    rows.append((y, " ".join(words[rng.randrange(len(words)) // 2 * 2 + y] for _ in range(n))))

with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "data.vw")
    with open(path, "w") as f:
        for y, t in rows:
            f.write(f"{1 if y else -1} | {t}\n")
    args = "--loss_function logistic --ngram 2 -b 20 --adaptive --quiet --noconstant"
    native, loop = [], []
    for _ in range(5):
        t0 = time.perf_counter()
        w = pyvw.Workspace(f"-d {path} {args}")
        w.finish()
        native.append(len(rows) / (time.perf_counter() - t0))
        w = pyvw.Workspace(args)
        t0 = time.perf_counter()
        for y, t in rows:
            w.learn(f"{1 if y else -1} | {t}")
        loop.append(len(rows) / (time.perf_counter() - t0))
        w.finish()
print(f"vowpal wabbit 9.11.9, words 1-2: native driver over a file {statistics.median(native):>9.0f} examples/s | "
      f"python loop of learn() {statistics.median(loop):>9.0f} examples/s")
