"""3D Gaussian splat .ply files in the standard INRIA 3DGS layout.

    x y z nx ny nz f_dc_0 f_dc_1 f_dc_2 opacity scale_0 scale_1 scale_2 rot_0 rot_1 rot_2 rot_3

float32, binary little-endian, one `vertex` element. Opacity is stored as a logit, scales as
natural logs, rotations as w-first quaternions; normals are zero. The writer builds one numpy
array and writes it with a single `tobytes()`; the reader finds properties by name, so files
with extra properties (f_rest_*, normals, other orders, doubles) load too.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_path
from pipeline.core.errors import InputError
from pipeline.core.types import Gaussians

PLY_PROPERTIES = (
    ("x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity")
    + ("scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3")
)
PLY_DTYPE = np.dtype([(name, "<f4") for name in PLY_PROPERTIES])
"""One PLY vertex row: 17 little-endian float32 fields, 68 bytes."""
_OPACITY_EPS = 1e-6  # opacity 0 or 1 would be an infinite logit (float32 resolves 1 - 1e-6)

_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1",
    "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4",
    "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def splat_ply_header(n: int, width: int = 0) -> bytes:
    """The header for n rows; `width` zero-pads the count so a smaller one can overwrite it in place."""
    lines = ["ply", "format binary_little_endian 1.0", f"element vertex {n:0{width}d}"]
    lines += [f"property float {name}" for name in PLY_PROPERTIES]
    lines.append("end_header")
    return ("\n".join(lines) + "\n").encode("ascii")


def splat_ply_rows(g: Gaussians) -> tuple[np.ndarray, int]:
    """(N', 17) float32 rows in PLY_PROPERTIES order, built in one vectorized pass, and the number
    of non-finite rows removed (NaN/inf inputs, or scales <= 0 whose log is not finite)."""
    n = len(g)
    p = np.clip(g.opacity, _OPACITY_EPS, 1.0 - _OPACITY_EPS)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        logit = np.log(p / (1.0 - p))
        log_scale = np.log(g.scale)
    # One interleaving copy from contiguous columns; strided writes into a row buffer cost more.
    rows = np.hstack([g.xyz, np.zeros((n, 3), np.float32), g.features_dc, logit, log_scale, g.rotation])
    with np.errstate(invalid="ignore", over="ignore"):
        finite = np.isfinite(rows @ np.ones(len(PLY_PROPERTIES), np.float32)) & np.isfinite(g.opacity[:, 0])
    if finite.all():
        return rows, 0
    # The sum can overflow for finite rows; decide those row by row.
    suspects = np.flatnonzero(~finite)
    finite[suspects] = np.isfinite(rows[suspects]).all(axis=1) & np.isfinite(g.opacity[suspects, 0])
    return rows[finite], int(n - finite.sum())


PLY_CHUNK = 1 << 17
"""Rows per chunk: chunks are encoded on all cores while earlier ones are being written."""


def write_splat_ply(path: str | os.PathLike[str], g: Gaussians) -> dict[str, int]:
    """Write Gaussians as a 3DGS .ply (atomically). Returns {'written': n, 'dropped_nonfinite': k}.

    Rows are built vectorized (no per-row Python), chunk by chunk on a thread pool (numpy releases
    the GIL), and each chunk is written as soon as it and the ones before it are ready, so encoding
    overlaps the disk write; a background fdatasync pushes written chunks to disk meanwhile, so the
    atomic write's final fsync has little left to do. The vertex count is zero-padded so that, when
    non-finite rows were dropped, the exact count overwrites it in place.
    """
    from concurrent.futures import Future, ThreadPoolExecutor

    n, dropped = len(g), 0
    width = len(str(n))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh, ThreadPoolExecutor(1) as syncer:
            fh.write(splat_ply_header(n, width))
            starts = range(0, n, PLY_CHUNK)
            writeback: Future | None = None
            with ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, len(starts)))) as pool:
                for i, (rows, k) in enumerate(pool.map(lambda a: splat_ply_rows(g.take(slice(a, a + PLY_CHUNK))), starts)):
                    dropped += k
                    if len(rows):
                        fh.write(memoryview(np.ascontiguousarray(rows)).cast("B"))
                    if i % 2 == 1 and (writeback is None or writeback.done()):
                        fh.flush()
                        writeback = syncer.submit(os.fdatasync, fh.fileno())
            if dropped:
                fh.seek(0)
                fh.write(splat_ply_header(n - dropped, width))
            fh.flush()
            if writeback is not None:
                writeback.result()
    return {"written": n - dropped, "dropped_nonfinite": dropped}


def _parse_header(fh, path: Path) -> tuple[str, list[tuple[str, int, list[tuple[str, str]]]], int]:
    """Returns (format, [(element, count, [(property, numpy dtype)])], header byte length)."""
    first = fh.readline()
    if first.strip() != b"ply":
        raise InputError(f"{path} is not a PLY file (no 'ply' magic line).", "pass a .ply written by a 3DGS tool.")
    fmt = ""
    elements: list[tuple[str, int, list[tuple[str, str]]]] = []
    while True:
        line = fh.readline()
        if not line:
            raise InputError(f"{path} has a truncated PLY header (no end_header).", "re-export the file.")
        words = line.decode("ascii", errors="replace").split()
        if not words or words[0] in ("comment", "obj_info"):
            continue
        if words[0] == "end_header":
            return fmt, elements, fh.tell()
        if words[0] == "format":
            fmt = words[1]
        elif words[0] == "element":
            elements.append((words[1], int(words[2]), []))
        elif words[0] == "property":
            if not elements:
                raise InputError(f"{path}: PLY property before any element.", "re-export the file.")
            if words[1] == "list":
                # List properties make rows variable-sized; only allowed after the vertex element.
                elements[-1][2].append((words[-1], "list"))
            else:
                if words[1] not in _PLY_TYPES:
                    raise InputError(f"{path}: unknown PLY property type {words[1]!r}.", "re-export the file.")
                elements[-1][2].append((words[2], _PLY_TYPES[words[1]]))


def read_splat_ply(path: str | os.PathLike[str]) -> Gaussians:
    """Read a 3DGS .ply into activated Gaussians (sigmoid opacity, exp scale, normalized rotation)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"PLY file not found: {path}.", "check the path.")
    with open(path, "rb") as fh:
        fmt, elements, offset = _parse_header(fh, path)
    if fmt not in ("binary_little_endian", "binary_big_endian", "ascii"):
        raise InputError(f"{path}: unsupported PLY format {fmt!r}.", "write it as binary_little_endian.")
    endian = ">" if fmt == "binary_big_endian" else "<"
    for name, count, props in elements:
        if name == "vertex":
            break
        if fmt != "ascii" and any(t == "list" for _, t in props):
            raise InputError(f"{path}: a list element comes before 'vertex'.", "write the vertex element first.")
        if fmt != "ascii":
            offset += count * int(np.dtype([(p, endian + t) for p, t in props]).itemsize)
    else:
        raise InputError(f"{path} has no 'vertex' element.", "pass a Gaussian splat .ply.")
    if any(t == "list" for _, t in props):
        raise InputError(f"{path}: the vertex element has list properties.", "pass a Gaussian splat .ply.")
    names = [p for p, _ in props]
    missing = [p for p in PLY_PROPERTIES if p not in names and not p.startswith("n")]
    if missing:
        raise InputError(f"{path} lacks Gaussian properties {missing}.", "pass a 3DGS .ply (x y z f_dc_* opacity scale_* rot_*).")

    if fmt == "ascii":
        with open(path, "rb") as fh:
            fh.seek(offset)
            try:
                flat = np.loadtxt(fh, dtype=np.float64, max_rows=count, ndmin=2)
            except ValueError as exc:
                raise InputError(f"{path}: unreadable ASCII PLY body ({exc}).", "re-export the file.") from exc
        if flat.shape != (count, len(names)):
            raise InputError(f"{path} is truncated: expected {count} vertices.", "re-export the file.")
        column = {p: flat[:, i] for i, p in enumerate(names)}
    else:
        dtype = np.dtype([(p, endian + t) for p, t in props])
        need = count * dtype.itemsize
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(need)
        if len(data) < need:
            raise InputError(
                f"{path} is truncated: {len(data)} of {need} bytes of vertex data.", "re-export or re-download the file."
            )
        table = np.frombuffer(data, dtype=dtype, count=count)
        column = {p: table[p] for p in names}

    def stack(keys: tuple[str, ...]) -> np.ndarray:
        return np.stack([np.asarray(column[k], dtype=np.float32) for k in keys], axis=1)

    xyz = stack(("x", "y", "z"))
    features_dc = stack(("f_dc_0", "f_dc_1", "f_dc_2"))
    opacity = 1.0 / (1.0 + np.exp(-stack(("opacity",)).astype(np.float64)))
    scale = np.exp(stack(("scale_0", "scale_1", "scale_2")).astype(np.float64))
    rotation = stack(("rot_0", "rot_1", "rot_2", "rot_3"))
    norm = np.linalg.norm(rotation, axis=1, keepdims=True)
    rotation = np.where(norm > 0, rotation / np.maximum(norm, 1e-12), np.array([1, 0, 0, 0], np.float32))
    return Gaussians(xyz, features_dc, opacity.astype(np.float32), scale.astype(np.float32), rotation)
