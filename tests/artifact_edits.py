"""Test helpers: copies of a real trained artifact, edited into a new version or into a broken one."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from app.manifest import MANIFEST_FILE, MODEL_FILE
from app.reload import model_hash


def copy_artifact(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return dst


def _rehash(artifact: Path) -> str:
    """Make manifest.model_version match the (edited) model file again."""
    version = model_hash(artifact / MODEL_FILE)
    manifest = json.loads((artifact / MANIFEST_FILE).read_text())
    manifest["model_version"] = version
    (artifact / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return version


def edit_model(src: Path, dst: Path, edit: Callable[[onnx.ModelProto], None]) -> str:
    """Copy src to dst, apply `edit` to its ONNX graph, fix the manifest's hash; returns the new version."""
    copy_artifact(src, dst)
    model = onnx.load(str(dst / MODEL_FILE))
    edit(model)
    onnx.save(model, str(dst / MODEL_FILE))
    return _rehash(dst)


def new_version(src: Path, dst: Path, tag: str) -> str:
    """The same network under a new content hash (only the graph's doc string differs)."""

    def retag(model: onnx.ModelProto) -> None:
        model.graph.doc_string = f"nextact test version {tag}"

    return edit_model(src, dst, retag)


def scale_output(factor: float) -> Callable[[onnx.ModelProto], None]:
    """An edit multiplying the probabilities by `factor` (NaN gives NaN outputs, 2 gives rows summing to 2)."""

    def edit(model: onnx.ModelProto) -> None:
        graph = model.graph
        out = graph.output[0].name
        for node in graph.node:
            for i, name in enumerate(node.output):
                if name == out:
                    node.output[i] = "unscaled_probabilities"
        graph.initializer.append(numpy_helper.from_array(np.array(factor, dtype=np.float32), "scale_factor"))
        graph.node.append(helper.make_node("Mul", ["unscaled_probabilities", "scale_factor"], [out]))

    return edit
