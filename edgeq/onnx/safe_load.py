"""Loading and saving ONNX files safely, including models above protobuf's 2 GB limit.

An ONNX tensor stored as external data names its file in ``location``, a path relative to the
model's directory.  A hostile file can name ``../../home/user/.ssh/id_rsa`` or ``/etc/passwd``
and make a loader read (and a later save write) outside that directory.  :func:`load_onnx`
refuses absolute locations, any ``..`` component, and anything that resolves (symlinks
included) outside the model's directory, before a byte of external data is read.

:func:`save_onnx` writes models whose weights exceed a threshold with every initializer in one
``<name>.data`` file beside the ``.onnx`` and restores the in-memory model afterwards (``onnx``
moves the bytes out of the proto while saving).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath, PureWindowsPath

from edgeq.errors import EdgeqError


def weight_bytes(model) -> int:
    """Bytes of initializer data (does not serialize the model, so works above 2 GB)."""
    return sum(len(t.raw_data) if t.raw_data else t.ByteSize() for t in model.graph.initializer)


def external_locations(model) -> list[str]:
    """Every external-data ``location`` referenced by a tensor of ``model`` (subgraphs included)."""
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    locs = []
    for t in _get_all_tensors(model):
        if uses_external_data(t):
            loc = next((e.value for e in t.external_data if e.key == "location"), "")
            locs.append(loc)
    return locs


def check_external_locations(model, onnx_path: Path) -> None:
    """Refuse external-data locations that are absolute, contain ``..`` or leave the directory."""
    base = onnx_path.resolve().parent
    for loc in dict.fromkeys(external_locations(model)):
        parts = set(PurePosixPath(loc).parts) | set(PureWindowsPath(loc).parts)
        if not loc or PurePosixPath(loc).is_absolute() or PureWindowsPath(loc).is_absolute() or ".." in parts:
            raise EdgeqError(
                f"{onnx_path} refers to external data at {loc!r}, outside its directory; refusing to read it "
                "(external data must be a plain file name beside the .onnx)"
            )
        target = (base / loc).resolve()
        if base not in target.parents:
            raise EdgeqError(f"{onnx_path}: external data {loc!r} resolves outside {base}; refusing to read it")
        if not target.is_file():
            raise EdgeqError(f"{onnx_path}: its external data file {loc} is missing; copy it next to the .onnx")


def load_onnx(onnx_path: str | Path, load_external: bool = True):
    """``onnx.ModelProto`` of ``onnx_path`` with external data checked (and loaded when asked)."""
    import onnx

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise EdgeqError(f"{onnx_path} does not exist; pass an .onnx file")
    try:
        model = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad input
        raise EdgeqError(f"{onnx_path} is not a readable ONNX file ({type(e).__name__}); "
                         "pass an edgeq .onnx file") from None
    if len(model.graph.node) == 0:
        raise EdgeqError(f"{onnx_path} holds no ONNX graph; pass an edgeq .onnx file")
    check_external_locations(model, onnx_path)
    if load_external and external_locations(model):
        onnx.load_external_data_for_model(model, str(onnx_path.resolve().parent))
    return model


def save_onnx(model, path: Path, external: bool) -> None:
    """Save ``model`` to ``path``; with ``external`` the initializers go to ``<path.name>.data``."""
    import onnx

    if not external:
        onnx.save_model(model, str(path))
        return
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # onnx appends to an existing file
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    onnx.load_external_data_for_model(model, str(path.parent))  # save moved the bytes out of the proto
