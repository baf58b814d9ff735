"""Tolerant parsing of a VLM's object list into sanitized `PlanItem`s.

Accepted answers, tried in this order on the text after any `<think>` block:
1. the reference system's `<prompt_list>[...]</prompt_list>`;
2. JSON inside ``` fences;
3. the whole answer as JSON, or the first JSON object/array inside prose;
4. a Python list literal (`ast.literal_eval`);
5. the complete `{...}` entries of a truncated JSON answer;
6. bullet or numbered lines ("- mug", "2. red chair").
JSON may be `{"objects": [...]}` (any list-valued key) or a bare list; entries are strings or
objects with a "phrase"/"label"/"name" and an optional `bbox_2d` on Qwen3-VL's 0-1000 grid.

Model text is untrusted: phrases are cleaned, anything that looks like a path or an instruction
is dropped with a warning, and phrases are never used in file names downstream.
"""

from __future__ import annotations

import ast
import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.types import PlanItem

GRID = 1000.0
"""Qwen3-VL boxes are relative to the image on a 0..1000 grid."""
GRID_SLACK = 50.0
"""Values this far outside 0..1000 are clamped (models overshoot a little); beyond it the box is dropped."""
MAX_PHRASE_CHARS = 60
MAX_PHRASE_WORDS = 8
MAX_TEXT_CHARS = 400_000
"""Longer answers are cut before parsing so a runaway answer cannot stall the run."""

PHRASE_KEYS = ("phrase", "label", "name", "object", "noun_phrase", "text", "category", "description")
BOX_KEYS = ("bbox_2d", "bbox", "box", "box_2d")

_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_PROMPT_LIST = re.compile(r"<prompt_list>(.*?)(?:</prompt_list>|$)", re.DOTALL | re.IGNORECASE)
FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_-]*)[ \t]*\n?(.*?)(?:```|$)", re.DOTALL)
_FLAT_OBJECT = re.compile(r"\{[^{}\[\]]*(?:\[[^\[\]{}]*\][^{}\[\]]*)*\}")
_BULLET_LINE = re.compile(r"^\s*(?:[-*\u2022\u00b7+]|\d{1,3}[.)]|\(\d{1,3}\))\s+(.+?)\s*$")
_LEADING_BULLET = re.compile(r"^(?:[-*\u2022\u00b7+#>]+|\d{1,3}[.)]|\(\d{1,3}\))\s*")
_QUOTES = "\"'`\u201c\u201d\u2018\u2019\u00ab\u00bb"
_INSTRUCTION = re.compile(
    r"\b(?:ignore|disregard|forget|override)\b.*\b(?:instruction|instructions|prompt|previous|above|rules)\b"
    r"|\b(?:system prompt|you are|you must|as an ai|assistant|jailbreak)\b"
    r"|\b(?:rm|sudo|curl|wget|chmod|eval|exec|import|os\.system)\b\s"
    r"|https?:|file:|[<>{}$|;`]|&&",
    re.IGNORECASE,
)
_ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-9;?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|.)")
_PATH_CHARS = re.compile(r"[/\\]|\.\.|~")
_ARTICLES = {"a", "an", "the", "some", "one", "two", "three", "four", "several", "many", "few", "of"}
_PLURAL_KEEP = ("ss", "us", "is", "ous")


@dataclass
class ParsedPlan:
    """What `parse_plan_details` found: the items, warnings and which answer format matched."""

    items: list[PlanItem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    answer_format: str = "none"  # prompt_list | fenced_json | json | python_list | truncated_json | lines | none
    entries_found: int = 0  # entries before sanitizing, merging and capping


def parse_plan_text(
    content: str | None, reasoning: str | None = None, *, image_size: tuple[int, int], max_objects: int
) -> tuple[list[PlanItem], list[str]]:
    """Parse a VLM answer into at most `max_objects` sanitized items; `image_size` is (W, H) in pixels."""
    parsed = parse_plan_details(content, reasoning, image_size=image_size, max_objects=max_objects)
    return parsed.items, parsed.warnings


def parse_plan_details(content: str | None, reasoning: str | None = None, *, image_size: tuple[int, int], max_objects: int) -> ParsedPlan:
    """Like `parse_plan_text`, also reporting the answer format and the raw entry count."""
    result = ParsedPlan()
    answer = strip_reasoning(content or "")
    entries, fmt = extract_entries(answer, result.warnings)
    if fmt == "none" and reasoning:
        # A thinking model cut off by max_tokens leaves its only list inside the reasoning.
        thoughts = re.sub(r"</?think>", " ", reasoning[:MAX_TEXT_CHARS], flags=re.IGNORECASE)
        entries, fmt = extract_entries(thoughts, result.warnings, structured_only=True)
        if fmt != "none":
            result.warnings.append("the answer held no object list; used the last list found in the model's reasoning")
    result.answer_format = fmt
    result.entries_found = len(entries)
    items = [item for item in (_entry_to_item(e, image_size, result.warnings) for e in entries) if item is not None]
    items = merge_near_duplicates(items, result.warnings)
    if max_objects >= 0 and len(items) > max_objects:
        result.warnings.append(f"the model proposed {len(items)} objects; kept the first {max_objects} (--max-objects)")
        items = items[:max_objects]
    result.items = items
    return result


def strip_reasoning(text: str) -> str:
    """Remove `<think>...</think>` blocks; with only a closing tag (the chat template opened it), keep what follows."""
    text = text[:MAX_TEXT_CHARS]
    text = _THINK_BLOCK.sub(" ", text)
    lowered = text.lower()
    if "</think>" in lowered:
        text = text[lowered.rfind("</think>") + len("</think>") :]
    elif "<think>" in lowered:
        # Unclosed: everything after the tag is unfinished reasoning, keep only what came before it.
        text = text[: lowered.find("<think>")]
    return text.strip()


def reasoning_from_text(text: str | None) -> str:
    """The reasoning inside `<think>` blocks, or before a lone `</think>`."""
    if not text:
        return ""
    blocks = [m.group(0)[len("<think>") : -len("</think>")] for m in _THINK_BLOCK.finditer(text)]
    if blocks:
        return "\n".join(b.strip() for b in blocks)
    lowered = text.lower()
    if "</think>" in lowered:
        return text[: lowered.find("</think>")].strip()
    if "<think>" in lowered:
        return text[lowered.find("<think>") + len("<think>") :].strip()
    return ""


def extract_entries(text: str, warnings: list[str], *, structured_only: bool = False) -> tuple[list[Any], str]:
    """Find the list of entries in an answer; returns (entries, format name)."""
    if not text.strip():
        return [], "none"
    # An explicit empty list is remembered and returned only if nothing else holds entries,
    # so callers can tell "the model saw nothing" from "the answer was unreadable".
    empty_format = "none"
    tagged = _PROMPT_LIST.findall(text)
    if tagged:
        entries = _literal_list(tagged[-1])
        if entries is None:
            entries = [ln for ln in (_bullet_or_plain(line) for line in tagged[-1].splitlines()) if ln]
        if entries:
            return entries, "prompt_list"
        empty_format = "prompt_list"
    for _lang, body in FENCE_RE.findall(text):
        entries = _literal_list(body)
        if entries:
            return entries, "fenced_json"
        if entries is not None and empty_format == "none":
            empty_format = "fenced_json"
    whole = _literal_list(text)
    if whole is not None:
        return whole, "json"
    embedded = _first_embedded_json(text, last=structured_only)
    if embedded:
        return embedded, "json"
    if embedded is not None and empty_format == "none":
        empty_format = "json"
    literal = _first_python_list(text)
    if literal:
        return literal, "python_list"
    flat = [obj for obj in (_dict_or_none(m) for m in _FLAT_OBJECT.findall(text)) if obj is not None]
    flat = [obj for obj in flat if any(k in obj for k in PHRASE_KEYS)]
    if flat:
        warnings.append(f"the JSON answer was incomplete; kept its {len(flat)} complete entries")
        return flat, "truncated_json"
    if structured_only or empty_format != "none":
        return [], empty_format
    lines = [b for b in (_bullet_line(line) for line in text.splitlines()) if b]
    if lines:
        return lines, "lines"
    return [], "none"


def json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _dict_or_none(text: str) -> dict[str, Any] | None:
    value = json_or_none(text)
    if value is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            return None
    return value if isinstance(value, dict) else None


def _literal_list(text: str) -> list[Any] | None:
    """JSON first, then a Python literal; None when neither gives a list of entries."""
    text = text.strip()
    value = json_or_none(text)
    if value is None:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None
    return entries_of(value) if value is not None else None


def entries_of(value: Any) -> list[Any] | None:
    """`{"objects": [...]}` (any list-valued key), a bare list, a tuple, or one object with a phrase."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, dict):
        for key in ("objects", "items", "phrases", "prompts", "results", "detections"):
            if isinstance(value.get(key), list):
                return value[key]
        if any(isinstance(value.get(k), str) for k in PHRASE_KEYS):
            return [value]
        for sub in value.values():
            if isinstance(sub, list) and (not sub or any(isinstance(e, (str, dict)) for e in sub)):
                return sub
    return None


def _first_embedded_json(text: str, *, last: bool = False) -> list[Any] | None:
    """The first (or last) JSON list, or object holding a list, inside prose.

    Returns [] when only an explicit empty list was found, None when there was nothing.
    A lone entry object is not accepted here: inside a truncated answer it would hide the rest.
    """
    decoder = json.JSONDecoder()
    found: list[Any] | None = None
    for match in re.finditer(r"[\[{]", text):
        try:
            value, _end = decoder.raw_decode(text, match.start())
        except (ValueError, RecursionError):
            continue
        if isinstance(value, dict) and any(isinstance(value.get(k), str) for k in PHRASE_KEYS):
            continue
        entries = entries_of(value)
        if entries is None:
            continue
        if not entries:
            found = found if found else []
            continue
        if any(isinstance(e, (str, dict)) for e in entries):
            if not last:
                return entries
            found = entries
    return found


def _first_python_list(text: str) -> list[Any] | None:
    start, end = text.find("["), text.rfind("]")
    if 0 <= start < end:
        try:
            value = ast.literal_eval(text[start : end + 1])
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = None
        if isinstance(value, list) and any(isinstance(v, (str, dict)) for v in value):
            return value
    for match in re.finditer(r"\[[^\[\]]*\]", text):
        try:
            value = ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            return value
    return None


def _bullet_line(line: str) -> str | None:
    match = _BULLET_LINE.match(line)
    return match.group(1) if match else None


def _bullet_or_plain(line: str) -> str | None:
    line = line.strip().strip(",")
    return _bullet_line(line) or (line if line else None)


def _entry_to_item(entry: Any, image_size: tuple[int, int], warnings: list[str]) -> PlanItem | None:
    raw_box: Any = None
    if isinstance(entry, dict):
        phrase_value = next((entry[k] for k in PHRASE_KEYS if isinstance(entry.get(k), str)), None)
        raw_box = next((entry[k] for k in BOX_KEYS if k in entry), None)
    elif isinstance(entry, str):
        phrase_value = entry
    else:
        warnings.append(f"ignored an entry that is not text or an object: {_preview(entry)}")
        return None
    if phrase_value is None:
        warnings.append(f"ignored an entry without a phrase: {_preview(entry)}")
        return None
    phrase = sanitize_phrase(phrase_value, warnings)
    if phrase is None:
        return None
    box = None
    if raw_box is not None:
        box = grid_box_to_pixels(raw_box, image_size, phrase=phrase, warnings=warnings)
    return PlanItem(phrase=phrase, box_xyxy=box)


def sanitize_phrase(value: str, warnings: list[str]) -> str | None:
    """A short clean noun phrase, or None (with a warning) for paths, instructions and empty text."""
    text = _ANSI_ESCAPE.sub(" ", value)
    text = "".join(" " if unicodedata.category(ch)[0] in "CZ" else ch for ch in text)
    text = " ".join(text.split())
    if _PATH_CHARS.search(text.rstrip(".")):  # before punctuation stripping, which would eat a leading '..'
        warnings.append(f"dropped a phrase with path characters: {_preview(text)}")
        return None
    for _ in range(3):  # bullets, quotes and punctuation can nest: '- "mug",'
        text = _LEADING_BULLET.sub("", text).strip().strip(_QUOTES).strip(" ,;:.!?*_").strip()
    if not text:
        return None
    if _INSTRUCTION.search(text):
        warnings.append(f"dropped a phrase that looks like an instruction, not an object: {_preview(text)}")
        return None
    words = text.split()
    if len(words) > MAX_PHRASE_WORDS:
        warnings.append(f"dropped a phrase of {len(words)} words (not a short noun phrase): {_preview(text)}")
        return None
    if len(text) > MAX_PHRASE_CHARS:
        cut = text[:MAX_PHRASE_CHARS].rsplit(" ", 1)[0] or text[:MAX_PHRASE_CHARS]
        warnings.append(f"shortened a phrase of {len(text)} characters to {len(cut)}: {_preview(cut)}")
        text = cut
    if not any(ch.isalpha() for ch in text):
        warnings.append(f"dropped a phrase without letters: {_preview(text)}")
        return None
    return text


def grid_box_to_pixels(
    raw: Any, image_size: tuple[int, int], *, phrase: str = "", warnings: list[str] | None = None
) -> tuple[float, float, float, float] | None:
    """A 0-1000 grid `[x1, y1, x2, y2]` -> pixel xyxy clamped to the image; None (warned) when unusable."""
    warnings = warnings if warnings is not None else []
    width, height = image_size
    label = f"box of '{phrase}'" if phrase else "box"
    if isinstance(raw, dict):
        raw = [raw.get(k) for k in ("x1", "y1", "x2", "y2")]
    try:
        values = [float(v) for v in raw]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        warnings.append(f"dropped the {label}: not four numbers ({_preview(raw)}); phrase kept")
        return None
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        warnings.append(f"dropped the {label}: not four finite numbers ({_preview(raw)}); phrase kept")
        return None
    x1, y1, x2, y2 = values
    if min(values) < -GRID_SLACK or max(values) > GRID + GRID_SLACK:
        warnings.append(f"dropped the {label}: {_preview(values)} is outside the 0-1000 grid; phrase kept")
        return None
    if x2 < x1 or y2 < y1:
        warnings.append(f"dropped the {label}: inverted corners {_preview(values)}; phrase kept")
        return None
    x1, x2 = (min(max(v, 0.0), GRID) * width / GRID for v in (x1, x2))
    y1, y2 = (min(max(v, 0.0), GRID) * height / GRID for v in (y1, y2))
    if x2 - x1 < 1.0 or y2 - y1 < 1.0:
        warnings.append(f"dropped the {label}: smaller than one pixel after clamping; phrase kept")
        return None
    return (round(x1, 2), round(y1, 2), round(x2, 2), round(y2, 2))


def phrase_key(phrase: str) -> str:
    """Case, articles, counts and simple plurals removed: 'A mug' and 'mugs' share a key."""
    words = re.findall(r"[^\W_]+", phrase.lower())
    words = [w for w in words if w not in _ARTICLES and not w.isdigit()]
    return " ".join(_singular(w) for w in words)


def _singular(word: str) -> str:
    if len(word) <= 3 or word.endswith(_PLURAL_KEEP):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "zes", "sses")):
        return word[:-2]
    if word.endswith("s"):
        return word[:-1]
    return word


def merge_near_duplicates(items: list[PlanItem], warnings: list[str], *, box_iou: float = 0.5) -> list[PlanItem]:
    """Merge items whose phrases share a `phrase_key`, unless both have clearly different boxes.

    Two 'mug' entries with separate boxes are two mugs (kept); 'a mug' then 'mugs' without boxes
    is one request (merged, the first spelling kept, a box taken from the later one if missing).
    """
    kept: list[PlanItem] = []
    by_key: dict[str, list[int]] = {}
    merged = 0
    for item in items:
        key = phrase_key(item.phrase) or item.phrase.lower()
        target = None
        for index in by_key.get(key, []):
            other = kept[index]
            if item.box_xyxy is None or other.box_xyxy is None or box_iou_xyxy(item.box_xyxy, other.box_xyxy) >= box_iou:
                target = index
                break
        if target is None:
            by_key.setdefault(key, []).append(len(kept))
            kept.append(PlanItem(item.phrase, item.box_xyxy))
            continue
        merged += 1
        if kept[target].box_xyxy is None and item.box_xyxy is not None:
            kept[target].box_xyxy = item.box_xyxy
    if merged:
        warnings.append(f"merged {merged} near-duplicate phrase(s)")
    return kept


def box_iou_xyxy(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _preview(value: Any, limit: int = 50) -> str:
    text = repr(value)
    text = "".join(ch if ch.isprintable() else "?" for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."
