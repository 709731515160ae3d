"""Int8 output layer: rewrite model.onnx (and step.onnx) so the hidden -> vocabulary layer runs in int8.

    python -m training quantize --artifact artifacts/beauty --out artifacts/beauty-int8

The output layer (a Gemm or MatMul whose constant weight has a vocabulary-sized dimension; one per ensemble
member) is the largest read of a model call: V x H float32 weights for every call. It becomes

    scale = max(|h|, per row) / 127                                 # (B, 1)  per row, so never batch-dependent
    q     = QuantizeLinear(h / scale, 1, 128)                       # (B, H)  uint8, symmetric around 128
    out   = MatMulIntegerToFloat(q, W8, 1, w_scale, 128) * scale + bias   # (B, V)

with W8 int8 per action (column) in [-63, 63]: 7 bits, so u8 x s8 pairs cannot saturate the 16-bit
intermediate of CPUs without VNNI and the result is the same on every CPU. Each row is quantized on its own
scale, so a row's probabilities do not depend on the other rows of its micro-batch.

The gate: the int8 graph against the float32 graph it replaces (itself gated against PyTorch to 1e-5) on
the export gate's inputs: max |probability difference| <= PROB_TOLERANCE and mean top-10 overlap >=
TOP10_MIN; PAD/UNK still exactly 0. The step graph is gated against the int8 model.onnx like a float one, at
the service's own load tolerance. Nothing is written unless every gate passes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from app.manifest import (
    MANIFEST_FILE,
    MODEL_FILE,
    PAD_ID,
    UNK_ID,
    Manifest,
    QuantizationSpec,
    read_manifest,
    write_manifest,
)
from training.errors import ArtifactError, ParityError
from training.export import parity_cases
from training.runtime import open_session, run

SCHEMES = ("none", "int8")
WEIGHT_LEVELS = 63  # 7-bit weights: see the module docstring
PROB_TOLERANCE = 0.01  # Beauty (V 12,070, H 256): 1.2e-4 on these inputs, 1.6e-3 on 512 real histories
TOP10_MIN = 0.9  # mean share of the float top 10 kept; Beauty: 0.994 here, 0.991 on real histories
STEP_TOLERANCE = 1e-4  # int8 step.onnx vs int8 model.onnx: the service's own load check (app/model.py)


class QuantizeError(ArtifactError):
    """A graph or artifact that cannot be quantized; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Agreement:
    """What the gate measured: largest |p_int8 - p_float| and the mean top-10 overlap."""

    max_abs_diff: float
    top10_overlap: float


def _output_layer(
    node: onnx.NodeProto, weights: dict[str, onnx.TensorProto], vocab: int
) -> np.ndarray | None:
    """The (K, V) float weight of an output layer node, else None."""
    if node.op_type not in ("Gemm", "MatMul") or len(node.input) < 2 or node.input[1] not in weights:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        return None
    w = numpy_helper.to_array(weights[node.input[1]])
    if w.ndim != 2 or w.dtype != np.float32:
        return None
    w = w.T if attrs.get("transB", 0) else w  # (K, V)
    return w if w.shape[1] == vocab else None


def _int8_nodes(
    node: onnx.NodeProto, w: np.ndarray, opset: int
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers replacing one output layer (see the module docstring)."""
    p = (node.name or node.output[0]) + "_int8"
    w64 = w.astype(np.float64)  # (K, V)
    w_scale = np.maximum(np.abs(w64).max(axis=0), 1e-30) / WEIGHT_LEVELS  # (V,) one per action
    w8 = np.clip(np.rint(w64 / w_scale), -WEIGHT_LEVELS, WEIGHT_LEVELS).astype(np.int8)  # (K, V)
    inits = [
        numpy_helper.from_array(w8, p + "_w"),
        numpy_helper.from_array(w_scale.astype(np.float32), p + "_w_scale"),
        numpy_helper.from_array(np.array(1 / 127, dtype=np.float32), p + "_inv127"),
        numpy_helper.from_array(np.array(1e-30, dtype=np.float32), p + "_tiny"),
        numpy_helper.from_array(np.array(1.0, dtype=np.float32), p + "_one"),
        numpy_helper.from_array(np.array(128, dtype=np.uint8), p + "_zero_point"),
    ]
    x = node.input[0]
    nodes = [helper.make_node("Abs", [x], [p + "_abs"], name=p + "_abs")]
    if opset >= 18:  # ReduceMax's axes became an input in opset 18
        inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), p + "_axes"))
        nodes.append(helper.make_node("ReduceMax", [p + "_abs", p + "_axes"], [p + "_amax"], keepdims=1))
    else:
        nodes.append(helper.make_node("ReduceMax", [p + "_abs"], [p + "_amax"], axes=[-1], keepdims=1))
    nodes += [
        helper.make_node("Max", [p + "_amax", p + "_tiny"], [p + "_amax_safe"]),  # a zero row: scale > 0
        helper.make_node("Mul", [p + "_amax_safe", p + "_inv127"], [p + "_scale"]),  # (B, 1)
        helper.make_node("Div", [x, p + "_scale"], [p + "_scaled"]),  # (B, K) in [-127, 127]
        helper.make_node("QuantizeLinear", [p + "_scaled", p + "_one", p + "_zero_point"], [p + "_q"]),
        helper.make_node(
            "MatMulIntegerToFloat",
            [p + "_q", p + "_w", p + "_one", p + "_w_scale", p + "_zero_point"],
            [p + "_mm"],
            domain="com.microsoft",
        ),  # (B, V)
    ]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    scaled = p + "_out" if bias else node.output[0]
    nodes.append(helper.make_node("Mul", [p + "_mm", p + "_scale"], [scaled]))  # (B, V)
    if bias:
        nodes.append(helper.make_node("Add", [scaled, bias], [node.output[0]]))
    for n in nodes:
        n.name = n.name or n.output[0]
    return nodes, inits


def quantize_graph(source: Path, dest: Path, vocab_size: int) -> int:
    """Write `source` with its output layer(s) in int8 to `dest`; returns how many layers were rewritten."""
    try:
        model = onnx.load(str(source))
    except Exception as e:  # onnx raises its own (protobuf) exception types
        raise QuantizeError(f"{source}: cannot read the ONNX graph: {e}") from e
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    weights = {t.name: t for t in graph.initializer}
    nodes: list[onnx.NodeProto] = []
    count = 0
    for node in graph.node:
        w = _output_layer(node, weights, vocab_size)
        if w is None:
            nodes.append(node)
            continue
        new_nodes, inits = _int8_nodes(node, w, opset)
        nodes += new_nodes
        graph.initializer.extend(inits)
        count += 1
    if not count:
        raise QuantizeError(
            f"{source}: no output layer to quantize (a Gemm or MatMul with a constant float32 weight of "
            f"{vocab_size} output columns); is it already quantized?"
        )
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for n in graph.node for name in n.input}
    kept = [t for t in graph.initializer if t.name in used]  # the float weights, unless also the embedding
    del graph.initializer[:]
    graph.initializer.extend(kept)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dest))
    return count


def agreement(float_probs: np.ndarray, int8_probs: np.ndarray, k: int = 10) -> Agreement:
    """Max |difference| and mean top-k overlap of two (B, V) probability arrays (PAD/UNK never ranked)."""
    diff = float(np.max(np.abs(float_probs.astype(np.float64) - int8_probs))) if float_probs.size else 0.0
    k = min(k, float_probs.shape[1] - 2)
    a, b = float_probs.copy(), int8_probs.copy()
    a[:, [PAD_ID, UNK_ID]] = -1.0
    b[:, [PAD_ID, UNK_ID]] = -1.0
    top_a = np.argsort(-a, axis=1, kind="stable")[:, :k]  # (B, k)
    top_b = np.argsort(-b, axis=1, kind="stable")[:, :k]
    shared = [len(set(x.tolist()) & set(y.tolist())) / k for x, y in zip(top_a, top_b, strict=True)]
    return Agreement(diff, float(np.mean(shared)) if shared else 1.0)


def check_quantized(float_path: Path, int8_path: Path, vocab_size: int, window: int) -> Agreement:
    """The int8 gate: the int8 graph vs the float32 one on the export gate's inputs (module docstring)."""
    reference, quantized = open_session(float_path), open_session(int8_path)
    want, got = [], []
    for case in parity_cases(vocab_size, window):
        try:
            q = run(quantized, case.action_ids, case.lengths)  # (B, V)
        except Exception as e:  # onnxruntime raises its own exception types
            raise ParityError(
                f"{int8_path}: ONNX Runtime cannot run the graph at {case.describe()}: {e}"
            ) from e
        if np.any(q[:, [PAD_ID, UNK_ID]] != 0):
            raise ParityError(
                f"{int8_path}: padding/unknown ids get probability above 0 at {case.describe()}"
            )
        want.append(run(reference, case.action_ids, case.lengths))
        got.append(q)
    measured = agreement(np.concatenate(want), np.concatenate(got))
    if not np.isfinite(measured.max_abs_diff) or measured.max_abs_diff > PROB_TOLERANCE:
        raise ParityError(
            f"{int8_path}: int8 and float32 graphs disagree: max |probability difference| "
            f"{measured.max_abs_diff:.3g} > {PROB_TOLERANCE:g}"
        )
    if measured.top10_overlap < TOP10_MIN:
        raise ParityError(
            f"{int8_path}: int8 keeps {measured.top10_overlap:.3f} of the float32 top 10 on average "
            f"(< {TOP10_MIN:g})"
        )
    return measured


def _sha16(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def quantize_artifact(source: Path, out: Path, scheme: str = "int8") -> QuantizationSpec:
    """Quantize `source`'s model.onnx (and step.onnx) into `out` (the same directory: in place), gated.

    Every other file is copied; the manifest gains `quantization`, a new model_version and the step graph's
    new hash. `out` must be `source`, or a directory that does not exist yet or is empty.
    """
    source, out = Path(source), Path(out)
    if scheme != "int8":
        raise QuantizeError(f"--quantize {scheme!r}: unknown scheme (choose from {', '.join(SCHEMES)})")
    manifest = read_manifest(source)
    if manifest.quantization is not None:
        raise QuantizeError(f"{source / MANIFEST_FILE}: already quantized ({manifest.quantization.scheme})")
    if not (source / MODEL_FILE).is_file():
        raise QuantizeError(f"{source / MODEL_FILE}: model file not found")
    in_place = out.resolve() == source.resolve()
    if not in_place and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise QuantizeError(f"--out {out}: exists and is not an empty directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _write(source, out, manifest, in_place)
    except BaseException:
        if created:  # a failed gate leaves no half-made directory behind
            shutil.rmtree(out, ignore_errors=True)
        raise


def _write(source: Path, out: Path, manifest: Manifest, in_place: bool) -> QuantizationSpec:
    """quantize_artifact's work: graphs and manifest staged in a directory inside `out`, moved in when gated."""
    with tempfile.TemporaryDirectory(dir=out, prefix=".quantize-") as tmp:
        stage = Path(tmp)
        shutil.copy2(source / MANIFEST_FILE, stage / MANIFEST_FILE)
        layers = quantize_graph(source / MODEL_FILE, stage / MODEL_FILE, manifest.vocab_size)
        measured = check_quantized(
            source / MODEL_FILE, stage / MODEL_FILE, manifest.vocab_size, manifest.window
        )
        spec = QuantizationSpec(
            scheme="int8",
            layers=layers,
            max_abs_diff=measured.max_abs_diff,
            top10_overlap=measured.top10_overlap,
            float_model_version=manifest.model_version,
        )
        updated = manifest.model_copy(
            update={"model_version": _sha16(stage / MODEL_FILE), "quantization": spec}
        )
        write_manifest(stage, updated)  # the step gate reads the staged manifest and model.onnx
        if manifest.step is not None:
            from training.step import check_step_parity

            step_file = stage / manifest.step.file
            quantize_graph(source / manifest.step.file, step_file, manifest.vocab_size)
            diff = check_step_parity(stage, step_file, STEP_TOLERANCE, state_shape=manifest.step.state_shape)
            step = manifest.step.model_copy(update={"sha256": _sha16(step_file), "parity_max_abs_diff": diff})
            updated = updated.model_copy(update={"step": step})
            write_manifest(stage, updated)
        if not in_place:
            for item in source.iterdir():
                if item.is_file() and not (stage / item.name).exists():
                    shutil.copy2(item, out / item.name)
        for name in [MODEL_FILE] + ([manifest.step.file] if manifest.step else []):
            os.replace(stage / name, out / name)
        os.replace(stage / MANIFEST_FILE, out / MANIFEST_FILE)  # last: a manifest describes what is there
    return spec
