"""The one factory of ONNX Runtime CPU sessions (validation, evaluation, benchmarks, deployment checks)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from edgeq.errors import EdgeqError

PROTOBUF_LIMIT = 2_000_000_000  # bytes; an in-memory model larger than this goes through a file


def make_session(model, threads: int = 0, spinning: bool = True, optimized_path: str | Path | None = None):
    """A CPU session of a path or serialized bytes; ``threads`` 0 = the runtime default.

    ``spinning=False`` makes idle workers block instead of spin: with several sessions alive in
    one process, the spinning workers of the session that just ran steal the cores of the next
    one (measured: 2 threads, FP32 MiniLM 1x16 8.3 ms with spinning vs 3.0 ms without, p10-p90
    2.6-8.3 vs 2.9-3.2), so benchmarks turn it off.  ``optimized_path``: also save the graph as
    ONNX Runtime optimized it (to check what it folded).  A model ONNX Runtime cannot load is an
    :class:`EdgeqError` naming it.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    source = str(model) if isinstance(model, Path) else model
    try:
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - ORT raises several types for unreadable models
        where = source if isinstance(source, str) else "the model"
        raise EdgeqError(f"ONNX Runtime cannot load {where}: {str(e).splitlines()[0][:200]}") from None


def session_of_model(model, threads: int = 0, external_data_threshold: int = PROTOBUF_LIMIT):
    """A session of an in-memory ``onnx.ModelProto``; above the threshold via a temporary file (2 GB limit)."""
    from edgeq.onnx.safe_load import save_onnx, weight_bytes

    if weight_bytes(model) <= external_data_threshold:
        return make_session(model.SerializeToString(), threads)
    with tempfile.TemporaryDirectory(prefix="edgeq-session-") as d:
        path = Path(d) / "model.onnx"
        save_onnx(model, path, True)
        return make_session(path, threads)  # ORT has read the weights; the files can go
