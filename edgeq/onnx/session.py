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
    so = _options(threads)
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return _session(str(model) if isinstance(model, Path) else model, so)


def _options(threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return so


def _session(source, so):
    import onnxruntime as ort

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


def session_with_weights(model, weights, threads: int = 0):
    """A session of ``model`` (a ModelProto whose weights are graph inputs named in ``weights``) with the numpy
    arrays ``weights`` as its initializers, without a serialized copy of them in memory.

    The arrays (views allowed: written in C order) go straight to a temporary external-data file beside
    the weightless graph, which ONNX Runtime loads as any file with external data (it copies the data,
    so the arrays may go once this returns; same outputs as a session of the whole model,
    ``tests/onnx/test_export.py``).
    """
    import numpy as np
    import onnx

    shell = onnx.ModelProto()
    shell.CopyFrom(model)  # no weights inside: small
    inputs = [i for i in model.graph.input if i.name not in weights]
    del shell.graph.input[:]
    shell.graph.input.extend(inputs)
    with tempfile.TemporaryDirectory(prefix="edgeq-session-") as d:
        offset = 0
        with open(Path(d) / "weights.bin", "wb") as f:
            for name, arr in weights.items():
                data = np.ascontiguousarray(arr)  # a view's bytes, one tensor at a time
                t = shell.graph.initializer.add()
                t.name, t.data_type = name, onnx.helper.np_dtype_to_tensor_dtype(data.dtype)
                t.dims.extend(data.shape)
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", "weights.bin"), ("offset", str(offset)), ("length", str(data.nbytes))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                data.tofile(f)
                offset += data.nbytes
        path = Path(d) / "model.onnx"
        path.write_bytes(shell.SerializeToString())
        return make_session(path, threads)  # ORT has read the weights; the files can go
