#!/usr/bin/env python3
"""The Python onnxruntime reference for tandem's MiniLM encoder speed (ENCODER.md).

Same texts, tokenizer, truncation (128 tokens), batching (32, sorted by length) and pooling as
tandem's encoder; the graph is the one scripts/minilm-onnx.py writes. Times tokenisation plus
inference, as `cargo bench -p tandem-models --bench models` does, and prints sentences/s.

Usage: bench-minilm-ort.py ASSET_DIR ONNX_FILE TEXTS_FILE [--threads N] [--dump OUT.f32]
TEXTS_FILE holds one JSON string per line (the cargo bench writes its two sets and prints this
command).
"""

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("asset_dir")
    ap.add_argument("onnx_file")
    ap.add_argument("texts_file")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dump")
    a = ap.parse_args()
    texts = [json.loads(line) for line in open(a.texts_file, encoding="utf-8") if line.strip()]
    tok = Tokenizer.from_file(f"{a.asset_dir}/tokenizer.json")
    tok.enable_truncation(max_length=128)
    tok.enable_padding()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = a.threads
    sess = ort.InferenceSession(a.onnx_file, opts, providers=["CPUExecutionProvider"])
    order = sorted(range(len(texts)), key=lambda i: len(texts[i].encode()))
    rates = []
    out = np.zeros((len(texts), 384), dtype=np.float32)
    for _ in range(a.runs):
        t0 = time.perf_counter()
        for s in range(0, len(order), a.batch):
            idx = order[s : s + a.batch]
            enc = tok.encode_batch([texts[i] for i in idx])
            feed = {
                "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
                "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
            }
            out[idx] = sess.run(["sentence_embedding"], feed)[0]
        rates.append(len(texts) / (time.perf_counter() - t0))
    print(
        f"python onnxruntime {ort.__version__} {a.onnx_file.rsplit('/', 1)[-1]}: "
        f"{statistics.median(rates):.1f} sentences/s (median of {a.runs}, {len(texts)} texts)"
    )
    if a.dump:
        out.tofile(a.dump)


if __name__ == "__main__":
    main()
