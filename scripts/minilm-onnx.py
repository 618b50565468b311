#!/usr/bin/env python3
"""Builds all-MiniLM-L6-v2 as an ONNX graph from the installed model.safetensors and config.json
(written by `scripts/setup minilm`), with mean pooling and L2 normalisation inside the graph, and
optionally a dynamic int8 copy (onnxruntime's quantize_dynamic). Nothing is downloaded here: the
weights are the sha256-pinned asset, the graph is written op by op with the `onnx` package.

Usage: minilm-onnx.py ASSET_DIR OUT_DIR   (writes OUT_DIR/model.onnx and OUT_DIR/model.int8.onnx)
Run by scripts/setup-onnx with the pinned packages of scripts/requirements-onnx.txt.

Inputs input_ids, attention_mask, token_type_ids (int64, [batch, seq]); output sentence_embedding
(float32, [batch, 384], unit length). Attention is onnxruntime's com.microsoft.Attention op (the
fused op its own transformer optimiser would produce); the rest are standard opset-20 ops that
onnxruntime fuses at load (SkipLayerNormalization, BiasGelu).
"""

import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

# Layers whose FFN output projection is kept in f32 in the int8 graph (see the end of build()).
F32_FFN_LAYERS = (0, 2)


def build(asset_dir: Path, out: Path) -> None:
    cfg = json.loads((asset_dir / "config.json").read_text())
    w = load_file(str(asset_dir / "model.safetensors"))
    hidden = cfg["hidden_size"]
    heads = cfg["num_attention_heads"]
    eps = float(cfg["layer_norm_eps"])
    inits = []
    nodes = []

    def const(name, arr):
        inits.append(numpy_helper.from_array(np.ascontiguousarray(arr), name))
        return name

    def node(op, ins, outs, domain=None, **attrs):
        nodes.append(helper.make_node(op, ins, outs, name=outs[0], domain=domain, **attrs))
        return outs[0]

    def linear(x, prefix, out_name):
        wt = const(prefix + ".weight_t", w[prefix + ".weight"].T)
        b = const(prefix + ".bias", w[prefix + ".bias"])
        mm = node("MatMul", [x, wt], [out_name + "_mm"])
        return node("Add", [mm, b], [out_name])

    def layer_norm(x, prefix, out_name):
        g = const(prefix + ".weight", w[prefix + ".weight"])
        b = const(prefix + ".bias", w[prefix + ".bias"])
        return node("LayerNormalization", [x, g, b], [out_name], axis=-1, epsilon=eps)

    # Embeddings: word + position + token type, then LayerNorm.
    const("word", w["embeddings.word_embeddings.weight"])
    const("pos", w["embeddings.position_embeddings.weight"])
    const("types", w["embeddings.token_type_embeddings.weight"])
    const("axis1", np.array([1], dtype=np.int64))
    const("axis2", np.array([2], dtype=np.int64))
    const("axis0", np.array([0], dtype=np.int64))
    node("Shape", ["input_ids"], ["seq_len"], start=1, end=2)
    node("Gather", ["word", "input_ids"], ["e_word"], axis=0)
    node("Slice", ["pos", "axis0", "seq_len", "axis0"], ["e_pos"])
    node("Gather", ["types", "token_type_ids"], ["e_type"], axis=0)
    node("Add", ["e_word", "e_pos"], ["e_wp"])
    node("Add", ["e_wp", "e_type"], ["e_sum"])
    x = layer_norm("e_sum", "embeddings.LayerNorm", "h0")
    node("Cast", ["attention_mask"], ["mask_i32"], to=TensorProto.INT32)

    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layer.{i}"
        a = p + ".attention.self"
        qkv_w = np.concatenate(
            [w[f"{a}.{n}.weight"].T for n in ("query", "key", "value")], axis=1
        )
        qkv_b = np.concatenate([w[f"{a}.{n}.bias"] for n in ("query", "key", "value")])
        const(f"l{i}.qkv_w", qkv_w)
        const(f"l{i}.qkv_b", qkv_b)
        att = node(
            "Attention",
            [x, f"l{i}.qkv_w", f"l{i}.qkv_b", "mask_i32"],
            [f"l{i}.att"],
            domain="com.microsoft",
            num_heads=heads,
        )
        o = linear(att, p + ".attention.output.dense", f"l{i}.att_out")
        r = node("Add", [o, x], [f"l{i}.att_res"])
        x1 = layer_norm(r, p + ".attention.output.LayerNorm", f"l{i}.h_att")
        f = linear(x1, p + ".intermediate.dense", f"l{i}.ff1")
        g = node("Gelu", [f], [f"l{i}.gelu"])
        f2 = linear(g, p + ".output.dense", f"l{i}.ff2")
        r2 = node("Add", [f2, x1], [f"l{i}.ff_res"])
        x = layer_norm(r2, p + ".output.LayerNorm", f"h{i + 1}")

    # Mean pooling over real tokens, then unit length.
    node("Cast", ["attention_mask"], ["mask_f"], to=TensorProto.FLOAT)
    node("Unsqueeze", ["mask_f", "axis2"], ["mask_f3"])
    node("Mul", [x, "mask_f3"], ["masked"])
    node("ReduceSum", ["masked", "axis1"], ["summed"], keepdims=0)
    node("ReduceSum", ["mask_f3", "axis1"], ["count"], keepdims=0)
    const("tiny", np.array(1e-9, dtype=np.float32))
    node("Max", ["count", "tiny"], ["count_c"])
    node("Div", ["summed", "count_c"], ["mean"])
    node("ReduceL2", ["mean", "axis1"], ["norm"], keepdims=1)
    const("tiny_n", np.array(1e-12, dtype=np.float32))
    node("Max", ["norm", "tiny_n"], ["norm_c"])
    node("Div", ["mean", "norm_c"], ["sentence_embedding"])

    ins = [
        helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    outs = [
        helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", hidden])
    ]
    graph = helper.make_graph(nodes, "all-MiniLM-L6-v2", ins, outs, inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.microsoft", 1)],
        producer_name="tandem scripts/minilm-onnx.py",
    )
    model.ir_version = 10
    onnx.checker.check_model(model)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out / "model.onnx"))

    # int8 weights per output channel (per tensor loses too much: cosine 0.95), activations
    # quantised per batch at run time. The second MatMul of the FFN in layers 0 and 2 stays f32:
    # its GELU input has outliers, and with it the worst cosine to f32 is 0.984 instead of 0.99.
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(out / "model.onnx"),
        str(out / "model.int8.onnx"),
        weight_type=QuantType.QInt8,
        per_channel=True,
        op_types_to_quantize=["MatMul", "Attention"],
        nodes_to_exclude=[f"l{i}.ff2_mm" for i in F32_FFN_LAYERS],
        extra_options={"DefaultTensorType": TensorProto.FLOAT},
    )

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    build(Path(sys.argv[1]), Path(sys.argv[2]))
