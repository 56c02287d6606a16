"""Document helpers of the world VQA task (vargpt_world_vqa.yaml); the score is lmms-eval's own
VQAv2 rule. A document is one shard sample as Hugging Face's webdataset builder reads it:
``json`` (the record, datamodules/FORMAT.md) and ``img0.png`` (the image)."""
from lmms_eval.tasks.vqav2.utils import vqav2_process_results_val

IMAGE_TOKEN = "<image>"  # datamodules/tokens.py (not imported: lmms-eval loads this file by path)


def _user(doc):
    return next(m["content"] for m in doc["json"]["messages"] if m["role"] == "user")


def world_doc_to_visual(doc):
    return [doc["img0.png"].convert("RGB")]


def world_doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _user(doc).replace(IMAGE_TOKEN, "").strip()


def world_doc_to_target(doc):
    return doc["json"]["answers"][0]


def world_process_results(doc, results):
    """VQAv2 accuracy of the answer against the record's ten answers (lmms-eval's scorer). Each
    answer carries its annotator id, as in VQAv2: the scorer leaves one answer out by comparing
    the answer dicts, so ten equal dicts would leave every answer out and score 0."""
    rec = doc["json"]
    vqa_doc = {"question_id": rec["id"],
               "answers": [{"answer": a, "answer_id": i + 1} for i, a in enumerate(rec["answers"])]}
    return vqav2_process_results_val(vqa_doc, results)
