"""The run report (`<run>/report.html`) and the index of a folder of runs (`index.html`).

Both pages are self-contained: every image and GIF is embedded as a `data:` URI and the CSS is
inline, so a report can be mailed, archived or opened offline. Labels, prompts and model text
are untrusted and pass through `html.escape` on the way in; object IDs reach file paths only
after matching `obj_NNN`.
"""

from __future__ import annotations

import base64
import html
import io
import json
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageSequence

from pipeline.core.atomic import write_text_atomic
from pipeline.core.errors import InputError
from pipeline.core.runfolder import OBJECT_ID_RE, RunPaths

PHOTO_MAX_SIDE = 1280
"""Longest side of the embedded photo and overlay; keeps a report of a 6000x4500 photo small."""
THUMB_MAX_SIDE = 240
CUTOUT_MAX_SIDE = 160
GIF_EMBED_MAX_BYTES = 4 << 20
"""A GIF above this (or above its share of GIF_TOTAL_BUDGET_BYTES) is re-encoded smaller before embedding."""
GIF_TOTAL_BUDGET_BYTES = 12 << 20
"""What all object turntables together may add to a report; keeps a 15-object report mailable."""
GIF_REENCODE_SIDE = 256
GIF_MIN_SIDE = 96
TEXT_MAX_CHARS = 200_000
"""Model answers longer than this are cut in the report (the full text stays in plan.json)."""

OBJECT_FILES = ("gaussians.pt", "object.ply", "object.splat", "turntable.gif", "mesh.glb")
SCENE_FILES = ("scene.ply", "scene.splat", "scene.gif", "scene.glb")


def _e(value: Any) -> str:
    """Escape anything for HTML text or a quoted attribute."""
    return html.escape("" if value is None else str(value), quote=True)


# ----------------------------------------------------------------------------- reading a run


@dataclass
class ObjectRow:
    """One object as the report shows it: masks.json and run.json merged."""

    id: str
    label: str = ""
    prompt: str = ""
    score: float | None = None
    area: int | None = None
    n_gaussians: int | None = None
    status: str = ""
    error: str = ""
    seconds: float | None = None
    source: str = ""
    mask_file: str | None = None  # file name inside masks/, validated
    files: dict[str, Path] = field(default_factory=dict)  # name -> existing path under objects/<id>/


@dataclass
class RunView:
    """Everything the report reads from one run folder; missing parts are recorded, not fatal."""

    paths: RunPaths
    manifest: dict[str, Any]
    plan: dict[str, Any] | None
    masks: dict[str, Any] | None
    objects: list[ObjectRow]
    missing: list[str]  # human-readable lines: what is absent and why that may be
    problems: list[str]  # files that exist but could not be read

    @property
    def name(self) -> str:
        return self.paths.root.name


def _read_json(path: Path, problems: list[str], rel: str) -> Any | None:
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{rel} could not be read ({type(exc).__name__}: {exc})")
        return None


def _as_float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _as_int(value: Any) -> int | None:
    f = _as_float(value)
    return None if f is None else int(f)


def ply_vertex_count(path: Path) -> int | None:
    """Read `element vertex N` from a PLY header without loading the body."""
    try:
        with open(path, "rb") as fh:
            for _ in range(64):
                line = fh.readline(256)
                if not line or line.strip() == b"end_header":
                    break
                parts = line.split()
                if len(parts) == 3 and parts[0] == b"element" and parts[1] == b"vertex":
                    return int(parts[2])
    except (OSError, ValueError):
        return None
    return None


def load_run_view(run_dir: Path) -> RunView:
    """Collect what exists in `run_dir`. Raises InputError only if the folder itself is absent."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"Run folder not found: {run_dir}.", "pass the folder a run wrote (it holds run.json).")
    paths = RunPaths(run_dir)
    problems: list[str] = []
    missing: list[str] = []

    manifest = _read_json(paths.manifest, problems, "run.json")
    if not isinstance(manifest, dict):
        if not paths.manifest.exists():
            missing.append("run.json: no manifest (the run was not started by this pipeline, or was killed early).")
        manifest = {}
    plan = _read_json(paths.plan, problems, "stage1/plan.json")
    if plan is not None and not isinstance(plan, dict):
        problems.append("stage1/plan.json is not a JSON object.")
        plan = None
    masks = _read_json(paths.masks_json, problems, "masks/masks.json")
    if masks is not None and not isinstance(masks, dict):
        problems.append("masks/masks.json is not a JSON object.")
        masks = None

    if not paths.input_image.exists():
        missing.append("input/image.png: the photo is missing (stage 1 was not run in this folder).")
    if plan is None and not paths.plan.exists():
        missing.append("stage1/plan.json: no planner ran (planner 'none', masks given by hand, or stage 1 not run).")
    if masks is None and not paths.masks_json.exists():
        missing.append("masks/masks.json: no masks (stage 1 not run, or it found nothing).")
    if not (paths.masks_dir / "overlay.png").exists():
        missing.append("masks/overlay.png: no mask overlay.")
    if not (paths.scene_dir / "scene.gif").exists():
        missing.append("scene/scene.gif: no scene turntable (stage 2 not run, no object succeeded, or turntables off).")

    objects = _merge_objects(paths, manifest, masks)
    return RunView(paths, manifest, plan, masks, objects, missing, problems)


def _merge_objects(paths: RunPaths, manifest: dict[str, Any], masks: dict[str, Any] | None) -> list[ObjectRow]:
    rows: dict[str, ObjectRow] = {}
    mask_entries = masks.get("objects", []) if isinstance(masks, dict) else []
    for entry in mask_entries if isinstance(mask_entries, list) else []:
        if not isinstance(entry, dict) or "id" not in entry:
            continue
        oid = str(entry["id"])
        row = rows.setdefault(oid, ObjectRow(oid))
        row.label = str(entry.get("label") or "")
        row.prompt = str(entry.get("prompt") or "")
        row.score = _as_float(entry.get("score"))
        row.area = _as_int(entry.get("area"))
        row.source = str(entry.get("source") or "")
        mask_name = entry.get("mask")
        # Only a plain file name inside masks/ is followed; anything else could escape the run folder.
        if isinstance(mask_name, str) and Path(mask_name).name == mask_name and not mask_name.startswith("."):
            row.mask_file = mask_name
    manifest_objects = manifest.get("objects", {})
    for oid, info in manifest_objects.items() if isinstance(manifest_objects, dict) else []:
        if not isinstance(info, dict):
            continue
        row = rows.setdefault(str(oid), ObjectRow(str(oid)))
        if info.get("label") and not row.label:
            row.label = str(info["label"])
        if row.score is None:
            row.score = _as_float(info.get("score"))
        if row.area is None:
            row.area = _as_int(info.get("area"))
        row.n_gaussians = _as_int(info.get("n_gaussians"))
        row.status = str(info.get("status") or "")
        row.error = str(info.get("error") or "")
        row.seconds = _as_float(info.get("seconds"))

    for row in rows.values():
        if not OBJECT_ID_RE.match(row.id):
            continue  # never build paths from an id that is not ours
        folder = paths.object_dir(row.id)
        row.files = {name: folder / name for name in OBJECT_FILES if (folder / name).is_file()}
        if row.n_gaussians is None and "object.ply" in row.files:
            row.n_gaussians = ply_vertex_count(row.files["object.ply"])
        if not row.status:
            row.status = "done" if "gaussians.pt" in row.files else "not run"
    return sorted(rows.values(), key=lambda r: (not OBJECT_ID_RE.match(r.id), r.id))


# ----------------------------------------------------------------------------- embedding media


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def image_data_uri(path: Path, max_side: int = PHOTO_MAX_SIDE, *, quality: int = 85) -> str | None:
    """A still image downscaled to `max_side` and embedded as JPEG (PNG when it has alpha)."""
    try:
        with Image.open(path) as im:
            im.draft("RGB", (max_side, max_side))  # JPEG: decode at reduced size, saves memory on huge photos
            has_alpha = im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info)
            im = im.convert("RGBA" if has_alpha else "RGB")
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            if has_alpha:
                im.save(buf, format="PNG", optimize=True)
                return _data_uri(buf.getvalue(), "image/png")
            im.save(buf, format="JPEG", quality=quality, optimize=True)
            return _data_uri(buf.getvalue(), "image/jpeg")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _open_rgb(path: Path) -> Image.Image | None:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def gif_data_uri(path: Path, max_bytes: int = GIF_EMBED_MAX_BYTES) -> str | None:
    """An animated GIF embedded as is, or re-encoded at a smaller size when it exceeds `max_bytes`."""
    try:
        data = path.read_bytes()
        if len(data) <= max_bytes:
            with Image.open(io.BytesIO(data)) as im:
                im.verify()  # a truncated GIF would show as a broken image
            return _data_uri(data, "image/gif")
        with Image.open(path) as im:
            duration = im.info.get("duration", 80)
            # Bytes grow with the pixel count: shrink the side by the square root of the excess.
            side = int(max(GIF_MIN_SIDE, min(GIF_REENCODE_SIDE, max(im.size) * (max_bytes / len(data)) ** 0.5)))
            frames = []
            for frame in ImageSequence.Iterator(im):
                f = frame.convert("RGB")
                f.thumbnail((side, side), Image.Resampling.LANCZOS)
                frames.append(f)
        buf = io.BytesIO()
        frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=duration, loop=0)
        return _data_uri(buf.getvalue(), "image/gif")
    except (OSError, ValueError, IndexError, SyntaxError, Image.DecompressionBombError):
        return None


def mask_cutout_data_uri(photo: Image.Image, mask: Path, max_side: int = CUTOUT_MAX_SIDE) -> str | None:
    """The photo (RGB, decoded once per report) inside the mask's box, transparent outside the mask."""
    try:
        with Image.open(mask) as m_im:
            m = np.asarray(m_im.convert("L")) > 127  # (H, W) bool
        if photo.size != (m.shape[1], m.shape[0]):
            return None
        ys = np.flatnonzero(m.any(axis=1))
        xs = np.flatnonzero(m.any(axis=0))
        if len(xs) == 0:
            return None
        box = (int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1)
        crop = photo.crop(box)
        crop.putalpha(Image.fromarray((m[box[1] : box[3], box[0] : box[2]] * 255).astype(np.uint8), "L"))
        crop.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        crop.save(buf, format="PNG", optimize=True)
        return _data_uri(buf.getvalue(), "image/png")
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


# ----------------------------------------------------------------------------- formatting


def _fmt_float(value: float | None, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _fmt_int(value: int | None) -> str:
    return "—" if value is None else f"{value:,}"


def _fmt_seconds(value: float | None) -> str:
    if value is None:
        return "—"
    if value >= 60:
        return f"{int(value // 60)} min {value % 60:.0f} s"
    return f"{value:.2f} s"


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return f"{n} B"


def _cut(text: str) -> str:
    if len(text) <= TEXT_MAX_CHARS:
        return text
    return text[:TEXT_MAX_CHARS] + f"\n… ({len(text) - TEXT_MAX_CHARS:,} more characters in stage1/plan.json)"


def _rel_link(paths: RunPaths, path: Path) -> str:
    """A relative URL from report.html to `path` (works when the run folder is opened as is)."""
    rel = path.relative_to(paths.root).as_posix()
    return urllib.parse.quote(rel)


def _kv_table(items: Iterable[tuple[str, str]], cls: str = "kv") -> str:
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{v}</td></tr>" for k, v in items)
    return f'<table class="{cls}">{rows}</table>' if rows else '<p class="missing">Nothing recorded.</p>'


def _json_pre(value: Any) -> str:
    return f"<pre>{_e(json.dumps(value, indent=2, sort_keys=True, default=str))}</pre>"


CSS = """
:root { --fg:#1d2329; --muted:#66707a; --line:#d9dee3; --bg:#f6f7f9; --card:#fff; --ok:#1f7a3d; --bad:#b3261e; --warn:#8a5a00; }
* { box-sizing: border-box; }
body { margin:0; font:15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color:var(--fg); background:var(--bg); }
header { background:#20262d; color:#fff; padding:16px 24px; }
header h1 { margin:0; font-size:20px; word-break:break-all; }
header .meta { color:#c5ccd3; font-size:13px; margin-top:4px; }
main { padding:16px 24px 48px; max-width:1400px; margin:0 auto; }
section { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:14px 18px; margin:16px 0; }
h2 { font-size:17px; margin:0 0 10px; }
.pair { display:flex; flex-wrap:wrap; gap:16px; }
.pair figure { flex:1 1 300px; margin:0; min-width:0; }
.pair figure img { width:100%; max-height:420px; object-fit:contain; }
figure img { max-width:100%; height:auto; display:block; border:1px solid var(--line); border-radius:4px; background:#eee; }
figcaption { color:var(--muted); font-size:13px; margin-top:4px; }
table { border-collapse:collapse; width:100%; font-size:14px; }
th, td { text-align:left; padding:5px 8px; border-bottom:1px solid var(--line); vertical-align:top; }
thead th { background:#eef1f4; }
td.num, th.num { text-align:right; font-variant-numeric:tabular-nums; white-space:nowrap; }
table.kv th { width:220px; color:var(--muted); font-weight:500; }
.status { font-weight:600; }
.status-done { color:var(--ok); } .status-failed { color:var(--bad); } .status-skipped, .status-partial { color:var(--warn); } .status-pending { color:var(--muted); }
td.error { color:var(--bad); max-width:420px; word-break:break-word; }
.cards { display:grid; grid-template-columns:repeat(auto-fill, minmax(220px, 1fr)); gap:12px; }
.card { border:1px solid var(--line); border-radius:6px; padding:8px; background:#fbfcfd; }
.card h3 { font-size:14px; margin:0 0 6px; word-break:break-word; }
.card img { width:100%; height:auto; image-rendering:auto; border-radius:4px; background:#fff; }
.card .cutout { max-height:90px; width:auto; background:repeating-conic-gradient(#e5e8eb 0 25%, #fff 0 50%) 50%/12px 12px; }
.card .sub { font-size:13px; margin-top:4px; }
.placeholder { display:flex; align-items:center; justify-content:center; min-height:120px; color:var(--muted); background:#f0f2f4; border-radius:4px; font-size:13px; text-align:center; padding:8px; }
.missing { color:var(--muted); }
ul.missing-list li { color:var(--warn); }
.bar { height:10px; background:#4a7fd1; border-radius:2px; min-width:1px; }
pre { white-space:pre-wrap; word-break:break-word; background:#f3f5f7; border:1px solid var(--line); border-radius:4px; padding:10px; max-height:480px; overflow:auto; font-size:13px; }
details { margin:8px 0; } summary { cursor:pointer; font-weight:600; }
code { font-size:13px; }
a { color:#1f5fbf; }
.runs { display:grid; grid-template-columns:repeat(auto-fill, minmax(260px, 1fr)); gap:14px; }
.run { background:var(--card); border:1px solid var(--line); border-radius:8px; padding:10px; text-decoration:none; color:var(--fg); display:block; }
.run:hover { border-color:#1f5fbf; }
.run img { width:100%; height:160px; object-fit:cover; border-radius:4px; background:#eee; display:block; }
.run .name { font-weight:600; margin-top:6px; word-break:break-all; }
.run .sub { color:var(--muted); font-size:13px; }
"""


def _page(title: str, header: str, body: str) -> str:
    return (
        '<!doctype html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        # No network: everything is inline; the policy makes an accidental external URL fail loudly.
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
        "style-src 'unsafe-inline'\">\n"
        f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
        f"{header}\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


# ----------------------------------------------------------------------------- report sections


def _section_images(run: RunView) -> str:
    paths = run.paths
    figures = []
    photo = image_data_uri(paths.input_image) if paths.input_image.exists() else None
    if photo:
        figures.append(f'<figure><img id="photo" alt="input photo" src="{photo}"><figcaption>Input photo</figcaption></figure>')
    else:
        figures.append('<figure><div class="placeholder">No photo (input/image.png missing or unreadable)</div></figure>')
    overlay_path = paths.masks_dir / "overlay.png"
    overlay = image_data_uri(overlay_path, quality=90) if overlay_path.exists() else None
    if overlay:
        figures.append(
            f'<figure><img id="overlay" alt="numbered mask overlay" src="{overlay}">'
            "<figcaption>Masks, numbered as in the table</figcaption></figure>"
        )
    else:
        figures.append('<figure><div class="placeholder">No mask overlay (masks/overlay.png missing)</div></figure>')
    scene_gif = paths.scene_dir / "scene.gif"
    scene = gif_data_uri(scene_gif) if scene_gif.exists() else None
    if scene:
        figures.append(
            f'<figure><img id="scene-gif" alt="scene turntable" src="{scene}">'
            "<figcaption>Composed scene (scene/scene.gif)</figcaption></figure>"
        )
    else:
        figures.append('<figure><div class="placeholder">No scene turntable (scene/scene.gif missing)</div></figure>')
    return f'<section id="images"><h2>Photo, masks and scene</h2><div class="pair">{"".join(figures)}</div></section>'


def _section_table(run: RunView) -> str:
    if not run.objects:
        return '<section id="objects"><h2>Objects</h2><p class="missing">No objects in this run.</p></section>'
    counts: dict[str, int] = {}
    for row in run.objects:
        counts[row.status] = counts.get(row.status, 0) + 1
    summary = ", ".join(f"{n} {_e(s)}" for s, n in sorted(counts.items()))
    body = []
    for i, row in enumerate(run.objects, start=1):
        status_cls = "status-" + "".join(c for c in row.status if c.isalnum())
        body.append(
            f'<tr class="object-row" data-object-id="{_e(row.id)}">'
            f'<td class="num">{i}</td><td><code>{_e(row.id)}</code></td><td>{_e(row.label) or "—"}</td>'
            f'<td class="num">{_fmt_float(row.score)}</td><td class="num">{_fmt_int(row.area)}</td>'
            f'<td class="num">{_fmt_int(row.n_gaussians)}</td>'
            f'<td class="status {status_cls}">{_e(row.status)}</td>'
            f'<td class="error">{_e(row.error)}</td><td class="num">{_fmt_seconds(row.seconds)}</td></tr>'
        )
    head = (
        '<thead><tr><th class="num">#</th><th>ID</th><th>Label</th><th class="num">Score</th>'
        '<th class="num">Area (px)</th><th class="num">Gaussians</th><th>Status</th><th>Error</th>'
        '<th class="num">Time</th></tr></thead>'
    )
    return (
        f'<section id="objects"><h2>Objects ({len(run.objects)}: {summary})</h2>'
        f'<table id="objects-table">{head}<tbody>{"".join(body)}</tbody></table></section>'
    )


def _section_cards(run: RunView) -> str:
    if not run.objects:
        return ""
    cards = []
    photo = _open_rgb(run.paths.input_image) if any(row.mask_file for row in run.objects) else None
    n_gifs = sum(1 for row in run.objects if "turntable.gif" in row.files)
    gif_budget = min(GIF_EMBED_MAX_BYTES, GIF_TOTAL_BUDGET_BYTES // max(n_gifs, 1))
    for i, row in enumerate(run.objects, start=1):
        gif = row.files.get("turntable.gif")
        uri = gif_data_uri(gif, gif_budget) if gif else None
        if uri:
            media = f'<img class="turntable" alt="turntable of {_e(row.id)}" src="{uri}">'
        else:
            why = row.error or ("object not reconstructed" if row.status != "done" else "no turntable written")
            media = f'<div class="placeholder">No turntable: {_e(why)}</div>'
        cutout = ""
        if row.mask_file and photo is not None:
            c = mask_cutout_data_uri(photo, run.paths.masks_dir / row.mask_file)
            if c:
                cutout = f'<img class="cutout" alt="mask of {_e(row.id)}" src="{c}">'
        missing = [name for name in ("gaussians.pt", "object.ply", "turntable.gif") if name not in row.files]
        files = " · ".join(
            f'<a href="{_rel_link(run.paths, p)}">{_e(name)}</a>' for name, p in row.files.items() if name != "turntable.gif"
        )
        foot = files or '<span class="missing">no files</span>'
        if missing and OBJECT_ID_RE.match(row.id):
            foot += f'<br><span class="missing">missing: {_e(", ".join(missing))}</span>'
        cards.append(
            f'<div class="card" data-object-id="{_e(row.id)}"><h3>{i}. {_e(row.label) or "—"} '
            f'<small><code>{_e(row.id)}</code></small></h3>{media}{cutout}<div class="sub">{foot}</div></div>'
        )
    return f'<section id="turntables"><h2>Objects in 3D</h2><div class="cards">{"".join(cards)}</div></section>'


def _section_timings(run: RunView) -> str:
    timings = run.manifest.get("timings")
    items = [(str(k), _as_float(v)) for k, v in timings.items()] if isinstance(timings, dict) else []
    items = [(k, v) for k, v in items if v is not None]
    if not items:
        return '<section id="timings"><h2>Stage timings</h2><p class="missing">No timings recorded.</p></section>'
    longest = max(v for _, v in items) or 1.0
    rows = "".join(
        f'<tr><th>{_e(k)}</th><td class="num">{_fmt_seconds(v)}</td>'
        f'<td style="width:60%"><div class="bar" style="width:{100.0 * v / longest:.1f}%"></div></td></tr>'
        for k, v in items
    )
    return f'<section id="timings"><h2>Stage timings</h2><table class="kv">{rows}</table></section>'


def _section_backends(run: RunView) -> str:
    backends = run.manifest.get("backends")
    if not isinstance(backends, dict) or not backends:
        return '<section id="backends"><h2>Backends</h2><p class="missing">No backends recorded.</p></section>'
    reasons = backends.get("reasons")
    reasons = reasons if isinstance(reasons, dict) else {}
    rows = []
    for stage, value in backends.items():
        if stage == "reasons":
            continue
        shown = value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        rows.append(f"<tr><th>{_e(stage)}</th><td><code>{_e(shown)}</code></td><td>{_e(reasons.get(stage, ''))}</td></tr>")
    if isinstance(backends.get("reasons"), str):
        rows.append(f'<tr><th>reasons</th><td colspan="2">{_e(backends["reasons"])}</td></tr>')
    # Reasons for stages that have no backend entry are still worth showing.
    for stage, reason in reasons.items():
        if stage not in backends:
            rows.append(f"<tr><th>{_e(stage)}</th><td>—</td><td>{_e(reason)}</td></tr>")
    head = "<thead><tr><th>Stage</th><th>Backend</th><th>Why</th></tr></thead>"
    return f'<section id="backends"><h2>Backends</h2><table>{head}<tbody>{"".join(rows)}</tbody></table></section>'


def _section_planner(run: RunView) -> str:
    plan = run.plan
    if plan is None:
        return '<section id="planner"><h2>Planner</h2><p class="missing">No planner output (stage1/plan.json missing).</p></section>'
    parts = []
    meta = [(k, _e(plan[k])) for k in ("model", "mode", "query") if plan.get(k)]
    if meta:
        parts.append(_kv_table(meta))
    items = plan.get("items")
    if isinstance(items, list) and items:
        lis = []
        for item in items:
            if isinstance(item, dict):
                phrase = item.get("phrase", "")
                box = item.get("box_xyxy")
                box_txt = f' <span class="missing">box {_e(box)}</span>' if box else ""
                lis.append(f"<li>{_e(phrase)}{box_txt}</li>")
            else:
                lis.append(f"<li>{_e(item)}</li>")
        parts.append(f'<p>Planned {len(items)} item(s):</p><ol id="plan-items">{"".join(lis)}</ol>')
    else:
        parts.append('<p class="missing">The plan has no items.</p>')
    warnings = plan.get("warnings")
    if isinstance(warnings, list) and warnings:
        parts.append('<p>Warnings:</p><ul class="missing-list">' + "".join(f"<li>{_e(w)}</li>" for w in warnings) + "</ul>")
    for key, title in (("reasoning", "Reasoning"), ("raw_response", "Raw answer")):
        text = plan.get(key)
        if isinstance(text, str) and text.strip():
            parts.append(
                f'<details id="plan-{key.replace("_", "-")}"><summary>{title} ({len(text):,} characters)</summary>'
                f"<pre>{_e(_cut(text))}</pre></details>"
            )
        else:
            parts.append(f'<p class="missing">{title}: none recorded.</p>')
    return f'<section id="planner"><h2>Planner</h2>{"".join(parts)}</section>'


def _section_run_info(run: RunView) -> str:
    m = run.manifest
    parts = []
    inputs = m.get("inputs")
    rows: list[tuple[str, str]] = []
    if isinstance(inputs, dict):
        for name, info in inputs.items():
            if isinstance(info, dict):
                rows.append((f"{name} path", f"<code>{_e(info.get('path', '—'))}</code>"))
                rows.append((f"{name} sha256", f"<code>{_e(info.get('sha256', '—'))}</code>"))
            else:
                rows.append((str(name), _e(info)))
    parts.append("<h3>Inputs</h3>" + _kv_table(rows))
    versions = m.get("versions")
    if isinstance(versions, dict) and versions:
        parts.append(
            "<details><summary>Versions</summary>"
            + _kv_table((str(k), f"<code>{_e(v)}</code>") for k, v in versions.items())
            + "</details>"
        )
    config = m.get("config")
    if config:
        parts.append(f"<details><summary>Resolved config</summary>{_json_pre(config)}</details>")
    commands = m.get("commands")
    if isinstance(commands, list) and commands:
        parts.append(f"<details><summary>Commands</summary>{_json_pre(commands)}</details>")
    return f'<section id="run-info"><h2>Run</h2>{"".join(parts)}</section>'


def _section_files(run: RunView) -> str:
    paths = run.paths
    found = []
    for p in [paths.manifest, paths.plan, paths.masks_json] + [paths.scene_dir / n for n in SCENE_FILES]:
        if p.is_file():
            found.append(p)
    rows = "".join(
        f'<tr><td><a href="{_rel_link(paths, p)}">{_e(p.relative_to(paths.root).as_posix())}</a></td>'
        f'<td class="num">{_fmt_bytes(p.stat().st_size)}</td></tr>'
        for p in found
    )
    table = f"<table>{rows}</table>" if rows else '<p class="missing">No output files.</p>'
    return f'<section id="files"><h2>Files</h2>{table}</section>'


def _section_missing(run: RunView) -> str:
    lines = run.missing + run.problems
    if not lines:
        return ""
    lis = "".join(f"<li>{_e(line)}</li>" for line in lines)
    return f'<section id="missing"><h2>Missing or unreadable</h2><ul class="missing-list">{lis}</ul></section>'


def render_report(run: RunView) -> str:
    """The report page as one string."""
    m = run.manifest
    meta = " · ".join(
        _e(x)
        for x in (
            f"created {m['created']}" if m.get("created") else "",
            f"updated {m['updated']}" if m.get("updated") else "",
            f"{len(run.objects)} object(s)",
        )
        if x
    )
    header = f'<header><h1>sam3d-gs run: {_e(run.name)}</h1><div class="meta">{meta}</div></header>'
    body = "\n".join(
        s
        for s in (
            _section_missing(run),
            _section_images(run),
            _section_table(run),
            _section_cards(run),
            _section_timings(run),
            _section_backends(run),
            _section_planner(run),
            _section_run_info(run),
            _section_files(run),
        )
        if s
    )
    return _page(f"sam3d-gs · {run.name}", header, body)


def write_report(run_dir: Path) -> Path:
    """Write `<run_dir>/report.html` (self-contained, offline) and return its path."""
    run = load_run_view(Path(run_dir))
    return write_text_atomic(run.paths.report, render_report(run))


# ----------------------------------------------------------------------------- index of runs


def _is_run_dir(path: Path) -> bool:
    paths = RunPaths(path)
    return path.is_dir() and (paths.manifest.exists() or paths.report.exists() or paths.masks_json.exists())


def write_index(root: Path, *, build_missing_reports: bool = True) -> Path:
    """Write `<root>/index.html` linking each run's report.html, with a thumbnail and object count.

    Runs without a report get one first (`build_missing_reports`), so no link is dead. The root
    of a batch (it has batch.json) gets the batch index instead: every photo with its status.
    """
    root = Path(root)
    if not root.is_dir():
        raise InputError(f"Folder of runs not found: {root}.", "pass the output root, e.g. outputs/.")
    batch = _read_json(root / "batch.json", [], "batch.json")
    if isinstance(batch, dict) and isinstance(batch.get("photos"), list):
        return write_batch_index(root, batch["photos"])
    runs = sorted((p for p in root.iterdir() if _is_run_dir(p)), key=lambda p: p.stat().st_mtime, reverse=True)
    tiles = []
    for run_dir in runs:
        try:
            view = load_run_view(run_dir)
        except InputError:
            continue
        if build_missing_reports and not view.paths.report.exists():
            write_text_atomic(view.paths.report, render_report(view))
        thumb = image_data_uri(view.paths.input_image, THUMB_MAX_SIDE, quality=80) if view.paths.input_image.exists() else None
        img = f'<img alt="" src="{thumb}">' if thumb else '<div class="placeholder">no photo</div>'
        n_done = sum(1 for r in view.objects if r.status == "done")
        n_failed = sum(1 for r in view.objects if r.status == "failed")
        created = view.manifest.get("created", "")
        href = urllib.parse.quote(run_dir.name) + "/report.html"
        tiles.append(
            f'<a class="run" href="{href}" data-objects="{len(view.objects)}">{img}'
            f'<div class="name">{_e(run_dir.name)}</div>'
            f'<div class="sub"><span class="count">{len(view.objects)}</span> object(s): {n_done} done'
            f"{f', {n_failed} failed' if n_failed else ''}</div>"
            f'<div class="sub">{_e(created)}</div></a>'
        )
    body = f'<div class="runs">{"".join(tiles)}</div>' if tiles else '<p class="missing">No runs in this folder.</p>'
    header = f'<header><h1>sam3d-gs runs in {_e(root.resolve().name)}</h1><div class="meta">{len(tiles)} run(s)</div></header>'
    return write_text_atomic(root / "index.html", _page(f"sam3d-gs runs · {root.name}", header, body))


BATCH_STATUSES = ("done", "partial", "failed", "pending")


def write_batch_index(root: Path, photos: list[dict[str, Any]]) -> Path:
    """`<root>/index.html` of a batch: one row per photo of batch.json with its status, objects,
    time and error, linking its report (or its run folder while it has none). Built from the rows
    alone, never from the photos, so it takes milliseconds for thousands of them."""
    root = Path(root)
    counts = {s: 0 for s in BATCH_STATUSES}
    rows = []
    for n, p in enumerate(photos, 1):
        status = str(p.get("status", "pending"))
        counts[status] = counts.get(status, 0) + 1
        rel = str(p.get("run_dir", ""))
        href = urllib.parse.quote(rel) + ("/report.html" if (root / rel / "report.html").is_file() else "/")
        image = str(p.get("image", ""))
        seconds = _as_float(p.get("seconds"))
        rows.append(
            f'<tr class="photo" data-status="{_e(status)}"><td class="num">{n}</td>'
            f'<td><a href="{_e(href)}">{_e(rel)}</a><div class="sub">{_e(image[:300])}</div></td>'
            f'<td class="status status-{_e(status)}">{_e(status)}</td>'
            f'<td class="num">{_fmt_int(_as_int(p.get("objects")))}</td>'
            f'<td class="num">{_fmt_seconds(seconds)}</td>'
            f'<td class="error">{_e(str(p.get("error") or "")[:300])}</td></tr>'
        )
    table = (
        '<table class="batch"><thead><tr><th class="num">#</th><th>photo (run folder)</th><th>status</th>'
        '<th class="num">objects</th><th class="num">time</th><th>error</th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table>"
    )
    summary = ", ".join(f'<span class="status-{s}">{counts[s]} {s}</span>' for s in BATCH_STATUSES if counts.get(s))
    header = (
        f"<header><h1>sam3d-gs batch in {_e(root.resolve().name)}</h1>"
        f'<div class="meta">{len(photos)} photo(s): {summary or "none"}; details in batch.json</div></header>'
    )
    body = f"<section>{table}</section>" if rows else '<p class="missing">No photos in this batch.</p>'
    return write_text_atomic(root / "index.html", _page(f"sam3d-gs batch · {root.name}", header, body))
