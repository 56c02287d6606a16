"""Converters from the formats users bring to our shards (FORMAT.md).

    python -m datamodules.convert FORMAT --input PATH [--image-root DIR] --out DIR
        [--shard-size N] [--on-error fail|skip] [--resize PX] [--workers N] [format options]

FORMAT: sharegpt | llava | imagefolder | coco | vqav2. `--out` receives `{task}-NNNNNN.tar`
shards and manifest.json. ShareGPT records with a source `<image>` in a user turn and an
`<image_gen>` answer are editing samples (task `edit`, VARGPT-v1.1's editing data); `--task edit`
requires every record to be one. Images are stored as their original bytes unless --resize is given.
A missing/unreadable image, a placeholder/image count mismatch or a malformed record stops the
conversion with its id and file (exit status 1); --on-error skip skips it and the manifest
counts and lists it.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import random
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

from PIL import Image

from datamodules.schema import (
    EDIT_TASK,
    RecordError,
    ShardSample,
    ShardWriter,
    image_kinds,
    image_member,
    placeholders,
    sanitize_key,
    validate_edit_record,
    validate_record,
    write_manifest,
)
from datamodules.tokens import IMAGE_GEN_PLACEHOLDER, IMAGE_TOKEN

FORMATS = ("sharegpt", "llava", "imagefolder", "coco", "vqav2")
PIL_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpg"}
ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
VQA_PROMPT = "Answer the question using a single word or phrase."  # LLaVA-1.5's VQAv2 prompt


class ConversionError(RuntimeError):
    pass


@dataclass
class Item:
    """A normalised input sample before its images are read."""

    index: int  # position in the input (record number or line number)
    id: str
    task: str
    messages: List[Dict[str, str]]
    image_paths: List[str]  # absolute, placeholder order
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class Bad:
    index: int
    id: str
    reason: str


# --------------------------------------------------------------------------- input reading

def read_json_records(path: str) -> Iterator[Tuple[int, Any]]:
    """(index, record) from a JSON array file or JSON Lines; a bad line yields (line, RecordError)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not path.endswith(".jsonl"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if "Extra data" not in str(e):  # several top-level values: JSON Lines after all
                raise ConversionError(f"{path}: not valid JSON ({e}); fix the file or give JSON Lines (.jsonl)") from e
        else:
            if not isinstance(data, list):
                raise ConversionError(f"{path}: expected a JSON array of samples, got {type(data).__name__}")
            yield from enumerate(data)
            return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, RecordError(f"line {lineno}: bad JSON ({e})")


def _norm_messages(raw: Any, msg_key: str) -> List[Dict[str, str]]:
    if not isinstance(raw, list):
        raise RecordError(f"`{msg_key}` must be a list of messages")
    out = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RecordError(f"{msg_key}[{j}] is not an object")
        role = m.get("role", m.get("from"))
        content = m.get("content", m.get("value"))
        if role not in ROLE_MAP:
            raise RecordError(f"{msg_key}[{j}] has role {role!r}; valid: {', '.join(ROLE_MAP)}")
        if not isinstance(content, str):
            raise RecordError(f"{msg_key}[{j}] has no string content/value")
        out.append({"role": ROLE_MAP[role], "content": content})
    return out


def _resolve(image_root: str, p: Any) -> str:
    if not isinstance(p, str) or not p:
        raise RecordError(f"image path must be a non-empty string, got {p!r}")
    return p if os.path.isabs(p) else os.path.join(image_root, p)


def items_sharegpt(args: argparse.Namespace) -> Iterator[Item | Bad]:
    stem = sanitize_key(os.path.splitext(os.path.basename(args.input))[0])
    root = args.image_root or os.path.dirname(os.path.abspath(args.input))
    for idx, rec in read_json_records(args.input):
        sid = f"{stem}_{idx:06d}"
        try:
            if isinstance(rec, Exception):
                raise rec
            if not isinstance(rec, dict):
                raise RecordError("record is not a JSON object")
            sid = sanitize_key(rec.get("id", sid))
            key = "messages" if "messages" in rec else "conversations"
            if key not in rec:
                raise RecordError("no `messages` (or `conversations`) field")
            messages = _norm_messages(rec[key], key)
            if isinstance(rec.get("system"), str) and rec["system"] and messages[0]["role"] != "system":
                messages.insert(0, {"role": "system", "content": rec["system"]})
            images = rec.get("images") or []
            if isinstance(images, str):
                images = [images]
            task = sharegpt_task(messages, args.task)
            if task == EDIT_TASK:
                validate_edit_record({"messages": messages})
                n_ph = len(placeholders(messages))
                if len(images) != n_ph:
                    raise RecordError(f"{len(images)} image(s) listed for {n_ph} placeholder(s): list the source "
                                      f"image(s) first, then the edited (target) image, one per placeholder")
            paths = [_resolve(root, p) for p in images]
            yield Item(idx, sid, task, messages, paths)
        except RecordError as e:
            yield Bad(idx, sid, str(e))


def sharegpt_task(messages: List[Dict[str, str]], wanted: str = "auto") -> str:
    """The task of a ShareGPT record: ``edit`` (a source <image> in a user turn and an <image_gen>
    answer: VARGPT-v1.1's editing data), ``gen`` (<image_gen> only) or ``understanding``.
    ``wanted="edit"`` (``--task edit``) makes every record an edit sample (checked by the caller)."""
    if wanted == EDIT_TASK:
        return EDIT_TASK
    gen = any(IMAGE_GEN_PLACEHOLDER in m["content"] for m in messages)
    src = any(IMAGE_TOKEN in m["content"] for m in messages if m["role"] == "user")
    return EDIT_TASK if gen and src else "gen" if gen else "understanding"


def items_llava(args: argparse.Namespace) -> Iterator[Item | Bad]:
    stem = sanitize_key(os.path.splitext(os.path.basename(args.input))[0])
    root = args.image_root or os.path.dirname(os.path.abspath(args.input))
    for idx, rec in read_json_records(args.input):
        sid = f"{stem}_{idx:06d}"
        try:
            if isinstance(rec, Exception):
                raise rec
            if not isinstance(rec, dict):
                raise RecordError("record is not a JSON object")
            sid = sanitize_key(rec.get("id", sid))
            if "conversations" not in rec:
                raise RecordError("no `conversations` field")
            messages = _norm_messages(rec["conversations"], "conversations")
            image = rec.get("image")
            images = [] if image is None else ([image] if isinstance(image, str) else list(image))
            paths = [_resolve(root, p) for p in images]
            yield Item(idx, sid, "understanding", messages, paths)
        except RecordError as e:
            yield Bad(idx, sid, str(e))


GEN_TEMPLATES = (  # VARGPT-style instructions for class-folder data
    "Please generate an image of {name}.",
    "Can you draw {name}?",
    "I need a picture of {name}.",
    "Create an image showing {name}.",
    "Generate a photo of {name}.",
    "Draw me {name}, please.",
)


def _article(name: str) -> str:
    return ("an " if name[:1].lower() in "aeiou" else "a ") + name


def items_imagefolder(args: argparse.Namespace) -> Iterator[Item | Bad]:
    root = args.image_root or args.input
    if not os.path.isdir(root):
        raise ConversionError(f"{root}: not a directory of class folders")
    synsets = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    names = {s: s for s in synsets}
    cn_path = args.classnames or os.path.join(root, "classnames.txt")
    if os.path.exists(cn_path):
        with open(cn_path, encoding="utf-8") as f:
            for line in f:
                parts = line.strip().split(maxsplit=1)
                if len(parts) == 2:
                    names[parts[0]] = parts[1].split(",")[0].strip()
    templates = GEN_TEMPLATES
    if args.templates:
        with open(args.templates, encoding="utf-8") as f:
            templates = tuple(t.strip() for t in f if "{name}" in t)
    rng = random.Random(args.seed)
    idx = 0
    for label, syn in enumerate(synsets):
        for fn in sorted(os.listdir(os.path.join(root, syn))):
            path = os.path.join(root, syn, fn)
            if not os.path.isfile(path) or fn.startswith("."):
                continue
            name = names[syn]
            messages = [
                {"role": "user", "content": rng.choice(templates).format(name=_article(name))},
                {"role": "assistant", "content": IMAGE_GEN_PLACEHOLDER},
            ]
            sid = sanitize_key(f"{syn}_{os.path.splitext(fn)[0]}")
            extra = {"label": label, "class_name": name, "synset": syn}
            yield Item(idx, sid, "gen", messages, [path], extra)
            idx += 1


CAPTION_PROMPTS = ("Describe the image briefly.", "Write a short caption for this image.", "What does this picture show?")
T2I_TEMPLATES = ("Generate an image: {c}", "Draw this: {c}", "Create a picture of the following. {c}")


def items_coco(args: argparse.Namespace) -> Iterator[Item | Bad]:
    from pycocotools.coco import COCO  # only this converter needs it

    import contextlib

    try:
        with open(args.input, encoding="utf-8") as f:
            dataset = json.load(f)
        if not dataset.get("categories"):
            # Caption files have no categories; an empty `categories` list makes pycocotools
            # index `category_id`, which caption annotations lack.
            dataset.pop("categories", None)
        with contextlib.redirect_stdout(io.StringIO()):  # createIndex() prints progress
            coco = COCO()
            coco.dataset = dataset
            coco.createIndex()
    except Exception as e:  # noqa: BLE001 - pycocotools raises plain AssertionError/KeyError
        raise ConversionError(f"{args.input}: cannot load COCO captions ({e!r})") from e
    root = args.image_root or os.path.dirname(os.path.abspath(args.input))
    tasks = ("caption", "gen") if args.task == "both" else (args.task,)
    rng = random.Random(args.seed)
    idx = 0
    for img_id in sorted(coco.imgs):
        info = coco.imgs[img_id]
        anns = sorted(coco.imgToAnns.get(img_id, []), key=lambda a: a["id"])
        all_caps = [a.get("caption", "").strip() for a in anns]
        for a in anns:
            cap = a.get("caption")
            sid_base = f"coco_{img_id}_{a['id']}"
            if not isinstance(cap, str) or not cap.strip():
                yield Bad(idx, sid_base, "annotation has no caption text")
                idx += 1
                continue
            cap = cap.strip()
            extra = {"meta": {"image_id": img_id, "ann_id": a["id"], "file_name": info.get("file_name")}, "captions": all_caps}
            path = os.path.join(root, info.get("file_name", ""))
            for task in tasks:
                if task == "caption":
                    msgs = [
                        {"role": "user", "content": f"{IMAGE_TOKEN}\n{rng.choice(CAPTION_PROMPTS)}"},
                        {"role": "assistant", "content": cap},
                    ]
                else:
                    msgs = [
                        {"role": "user", "content": rng.choice(T2I_TEMPLATES).format(c=cap)},
                        {"role": "assistant", "content": IMAGE_GEN_PLACEHOLDER},
                    ]
                yield Item(idx, f"{sid_base}_{task}", task, msgs, [path], dict(extra))
            idx += 1


def items_vqav2(args: argparse.Namespace) -> Iterator[Item | Bad]:
    try:
        with open(args.input, encoding="utf-8") as f:
            qdata = json.load(f)
        anns: Dict[int, Dict[str, Any]] = {}
        if args.annotations:
            with open(args.annotations, encoding="utf-8") as f:
                anns = {a["question_id"]: a for a in json.load(f)["annotations"]}
        questions = qdata["questions"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConversionError(f"{args.input} / {args.annotations}: cannot read VQAv2 questions/annotations ({e!r})") from e
    root = args.image_root or os.path.dirname(os.path.abspath(args.input))
    subtype = qdata.get("data_subtype", "val2014")
    for idx, q in enumerate(questions):
        sid = f"vqav2_{q.get('question_id', idx)}"
        try:
            if not isinstance(q.get("question"), str) or "image_id" not in q or "question_id" not in q:
                raise RecordError("question needs `question`, `image_id` and `question_id`")
            fname = args.image_template.format(subtype=subtype, image_id=int(q["image_id"]))
            msgs = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{q['question']}\n{VQA_PROMPT}"}]
            extra: Dict[str, Any] = {"meta": {"question_id": q["question_id"], "image_id": q["image_id"]}}
            a = anns.get(q["question_id"])
            if args.annotations and a is None:
                raise RecordError(f"no annotation for question_id {q['question_id']}")
            if a is not None:
                answers = [x["answer"] for x in a["answers"]]
                msgs.append({"role": "assistant", "content": a["multiple_choice_answer"]})
                extra["answers"] = answers
                extra["meta"].update(question_type=a.get("question_type"), answer_type=a.get("answer_type"))
            yield Item(idx, sid, "vqa", msgs, [os.path.join(root, fname)], extra)
        except (RecordError, KeyError, TypeError, ValueError) as e:
            yield Bad(idx, sid, str(e))


ITEMS = {
    "sharegpt": items_sharegpt,
    "llava": items_llava,
    "imagefolder": items_imagefolder,
    "coco": items_coco,
    "vqav2": items_vqav2,
}


# --------------------------------------------------------------------------- image reading

def read_image(path: str, resize: int = 0) -> Tuple[bytes, str]:
    """(bytes, ext) of one image; original bytes unless `resize` > 0. Raises RecordError."""
    if not os.path.exists(path):
        raise RecordError(f"image not found: {path}")
    try:
        with open(path, "rb") as f:
            data = f.read()
        im = Image.open(io.BytesIO(data))
        fmt = im.format
        im.load()  # full decode: catches truncated files that a header check misses
    except Exception as e:  # noqa: BLE001 - PIL raises many types for a bad file
        raise RecordError(f"cannot read image {path}: {e}") from e
    if fmt not in PIL_EXT:
        raise RecordError(f"unsupported image format {fmt} in {path}")
    if resize and min(im.size) > resize:
        scale = resize / min(im.size)
        im = im.convert("RGB").resize((round(im.width * scale), round(im.height * scale)), Image.BICUBIC)
        buf = io.BytesIO()
        fmt = "PNG" if fmt == "PNG" else "JPEG"
        im.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
        data = buf.getvalue()
    return data, PIL_EXT[fmt]


def _build(job: Tuple[Item, str, int]) -> ShardSample | Bad:
    item, source, resize = job
    try:
        rec: Dict[str, Any] = {"id": item.id, "task": item.task, "source": source, "messages": item.messages}
        rec["images"] = [""] * len(item.image_paths)
        validate_record(rec)  # placeholder/image count and roles before touching the disk
        files: Dict[str, bytes] = {}
        kinds = image_kinds(rec)
        for i, p in enumerate(item.image_paths):
            try:
                data, ext = read_image(p, resize)
            except RecordError as e:
                if item.task != EDIT_TASK:
                    raise
                which = "target (edited) image" if kinds[i] == "gen" else "source image"
                raise RecordError(f"{which} {i} of the edit sample: {e}; fix `images` (source first, then "
                                  f"the target) or --image-root") from e
            rec["images"][i] = image_member(i, ext)
            files[rec["images"][i]] = data
        rec["image_paths"] = item.image_paths
        if resize:
            rec["resized"] = resize
        rec.update(item.extra)
        return ShardSample(key=item.id, record=rec, files=files)
    except RecordError as e:
        return Bad(item.index, item.id, str(e))


def convert(args: argparse.Namespace) -> Dict[str, Any]:
    """Run one conversion; returns the manifest. Raises ConversionError (on_error=fail)."""
    src_file = args.input
    source = f"{args.format}:{os.path.basename(os.path.normpath(src_file))}"
    writers: Dict[str, ShardWriter] = {}
    skipped: List[Dict[str, Any]] = []

    def handle_bad(b: Bad) -> None:
        msg = f"{src_file}: sample {b.id!r} (record {b.index}): {b.reason}"
        if args.on_error == "fail":
            for w in writers.values():
                w.close()
            raise ConversionError(msg + "  (use --on-error skip to skip such samples)")
        print(f"skipped: {msg}", file=sys.stderr)
        skipped.append({"id": b.id, "file": src_file, "index": b.index, "reason": b.reason})

    def jobs() -> Iterator[Tuple[Item, str, int] | Bad]:
        for it in ITEMS[args.format](args):
            yield it if isinstance(it, Bad) else (it, source, args.resize)

    def results() -> Iterator[ShardSample | Bad]:
        if args.workers > 0:
            # Keep the input order (deterministic shards): map in ordered chunks.
            with ProcessPoolExecutor(args.workers) as ex:
                batch: List[Any] = []
                for j in jobs():
                    batch.append(j)
                    if len(batch) >= 256:
                        yield from _run_batch(ex, batch)
                        batch = []
                yield from _run_batch(ex, batch)
        else:
            for j in jobs():
                yield j if isinstance(j, Bad) else _build(j)

    seen: set = set()
    for r in results():
        if isinstance(r, Bad):
            handle_bad(r)
            continue
        if r.key in seen:
            handle_bad(Bad(-1, r.key, "duplicate sample id"))
            continue
        seen.add(r.key)
        task = r.record["task"]
        if task not in writers:
            writers[task] = ShardWriter(args.out, task, args.shard_size)
        writers[task].write(r)
    shards = [s for t in sorted(writers) for s in writers[t].close()]
    os.makedirs(args.out, exist_ok=True)
    return write_manifest(args.out, shards, source=source, skipped=skipped,
                          extra={"converter": {"format": args.format, "input": os.path.abspath(src_file),
                                               "resize": args.resize}})


def _run_batch(ex: ProcessPoolExecutor, batch: List[Any]) -> Iterator[ShardSample | Bad]:
    todo = [j for j in batch if not isinstance(j, Bad)]
    built = iter(ex.map(_build, todo, chunksize=16))
    for j in batch:
        yield j if isinstance(j, Bad) else next(built)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m datamodules.convert", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="format", required=True, metavar="FORMAT")
    helps = {
        "sharegpt": "VARGPT / LLaMA-Factory ShareGPT JSON(L): messages (role/content) + images",
        "llava": "LLaVA-1.5 instruction JSON(L): id, image, conversations (from/value)",
        "imagefolder": "ImageNet-style class folders -> generation instructions (--input = root)",
        "coco": "COCO captions JSON (pycocotools) -> captioning and/or caption-to-image",
        "vqav2": "VQAv2 questions (+ annotations) -> evaluation samples with all ten answers",
    }
    for fmt in FORMATS:
        p = sub.add_parser(fmt, help=helps[fmt])
        p.add_argument("--input", required=True)
        p.add_argument("--image-root", default="", help="base of relative image paths (default: the input's folder)")
        p.add_argument("--out", required=True)
        p.add_argument("--shard-size", type=int, default=1000)
        p.add_argument("--on-error", choices=("fail", "skip"), default="fail")
        p.add_argument("--resize", type=int, default=0, help="shorter side to PX (never upscales); 0 = keep bytes")
        p.add_argument("--workers", type=int, default=0)
        p.add_argument("--seed", type=int, default=0, help="prompt template choice")
        if fmt == "imagefolder":
            p.add_argument("--classnames", default="", help="'synset name' per line (default: INPUT/classnames.txt)")
            p.add_argument("--templates", default="", help="file of instruction templates with {name}")
        if fmt == "coco":
            p.add_argument("--task", choices=("caption", "gen", "both"), default="both")
        if fmt == "sharegpt":
            p.add_argument("--task", choices=("auto", EDIT_TASK), default="auto",
                           help="auto: edit / gen / understanding from the placeholders; edit: every record "
                                "must be an editing sample (source <image> in the user turn, <image_gen> answer)")
        if fmt == "vqav2":
            p.add_argument("--annotations", default="", help="v2_mscoco_*_annotations.json (omit for test-dev)")
            p.add_argument("--image-template", default="COCO_{subtype}_{image_id:012d}.jpg")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        m = convert(args)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{m['num_samples']} samples in {len(m['shards'])} shards, {m['num_skipped']} skipped -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
