"""VQA answer scoring, equal to the lmms-eval VQAv2 scorer (EvalAI answer normalisation).

The rules, as lmms-eval's ``vqav2_process_results`` + ``EvalAIAnswerProcessor`` apply them
(written from their behaviour; ``tests/test_metrics_vqa.py`` checks every case of
``tests/fixtures/vqav2_scoring_vectors.json``, which that scorer produced):

prediction, full normalisation (``normalize_vqa_answer``):
  1. lower-case; delete every ``,`` and ``?``; ``'s`` -> `` 's``; strip
  2. newlines / tabs -> spaces; strip
  3. punctuation: each of ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` is deleted when the text
     has it next to a space or has a digit-comma-digit group anywhere, else replaced by a space
     (the test looks at the text *before* any replacement); then a ``.`` not followed by a digit
     is deleted, at most 32 of them (the reference passes ``re.UNICODE`` = 32 as the count)
  4. words (whitespace split, lower-cased): number words zero..ten and "none" -> digits,
     articles a/an/the dropped, apostrophe-less contractions restored ("dont" -> "don't")
ground truth: only newlines/tabs -> spaces and strip. Only when the stripped answers are *not
  all identical* do they, and the already-normalised prediction, get steps 3 and 4 again.
  (So ten copies of "Yes" never match a prediction "yes": a quirk of the reference, kept.)
score: for each of the n human answers, leave that one out and count the others equal to the
  prediction: ``min(1, matches / 3)``; the score is the mean over the n (``statistics.mean``,
  exactly as the reference, so values compare with ``==``).

Single-answer datasets: with one answer the leave-one-out rule always gives 0, so there we score
the exact match of the fully normalised answer and prediction (what ``ExactMatchAccuracy`` does).
"""
from __future__ import annotations

import re
import statistics
from typing import Any, Sequence, Union

import torch
from torch import Tensor
from torchmetrics import Metric

# Apostrophe-less spellings -> the contraction (EvalAI's table; a few keys are capitalised in the
# reference and so can never match lower-cased text; kept for fidelity).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
# A digit-comma-digit group anywhere switches every punctuation mark to "delete" (no space).
_DIGIT_COMMA_DIGIT = re.compile(r"(?<=\d),+(?=\d)")
# A period not followed by a digit ("1.5" keeps its point). The reference's pattern starts with
# a malformed look-behind that is in effect a no-op look-ahead, so this is equivalent.
_PERIOD_NOT_DECIMAL = re.compile(r"\.(?!\d)")
_MAX_PERIODS_REMOVED = 32  # the reference passes re.UNICODE (== 32) as re.sub's count


def _strip_punctuation(text: str) -> str:
    """Step 3. Each mark is decided on the *input* text, so the order of the marks is irrelevant."""
    delete_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in _PUNCTUATION:
        if mark not in out:
            continue
        glued_to_space = (mark + " ") in text or (" " + mark) in text
        out = out.replace(mark, "" if (delete_all or glued_to_space) else " ")
    return _PERIOD_NOT_DECIMAL.sub("", out, count=_MAX_PERIODS_REMOVED)


def _normalize_words(text: str) -> str:
    """Step 4: digits for number words, no articles, contractions restored; single spaces."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """EvalAI's full normalisation of one answer string (what lmms-eval applies to predictions)."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return _normalize_words(_strip_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Score one prediction against its human answers exactly as the lmms-eval VQAv2 scorer.

    ``answers`` holds the raw answer strings (VQAv2: ten). One answer: normalised exact match.
    """
    if isinstance(answers, str) or len(answers) == 0:
        raise ValueError(
            f"vqa_accuracy needs a non-empty list of answer strings, got {answers!r} "
            f"(prediction {prediction!r})"
        )
    pred = normalize_vqa_answer(prediction)
    if len(answers) == 1:
        return float(pred == normalize_vqa_answer(answers[0]))
    gts = [a.replace("\n", " ").replace("\t", " ").strip() for a in answers]
    if len(set(gts)) > 1:
        gts = [_normalize_words(_strip_punctuation(g)) for g in gts]
        pred = _normalize_words(_strip_punctuation(pred))
    n_equal = sum(g == pred for g in gts)
    # Leave answer i out: the others equal to the prediction are n_equal minus (answer i matches).
    per_answer = [min(1.0, (n_equal - (g == pred)) / 3) for g in gts]
    # statistics.mean sums exactly and rounds once, as the reference does (0.3 stays 0.3).
    return float(statistics.mean(per_answer))


def exact_match(prediction: str, answers: Union[str, Sequence[str]]) -> float:
    """1.0 when the normalised prediction equals the (or any listed) normalised answer."""
    options = [answers] if isinstance(answers, str) else list(answers)
    if not options:
        raise ValueError(f"exact_match needs at least one answer (prediction {prediction!r})")
    pred = normalize_vqa_answer(prediction)
    return float(any(pred == normalize_vqa_answer(a) for a in options))


class _MeanScore(Metric):
    """Mean of per-sample scores; state is a float64 sum and a count, summed across processes.
    ``keep_scores=True`` also keeps each sample's score (``per_sample()``: this process's, in
    update order), for an interval over the samples without scoring them a second time."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, keep_scores: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.keep_scores = keep_scores
        self.add_state("score_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        if keep_scores:
            self.add_state("scores", default=[], dist_reduce_fx="cat")

    def _score(self, prediction: str, answers: Any) -> float:
        raise NotImplementedError

    def update(self, predictions: Sequence[str], answers: Sequence[Any]) -> None:
        if isinstance(predictions, str):
            raise TypeError("predictions must be a list of strings, got a single str")
        if len(predictions) != len(answers):
            raise ValueError(
                f"{type(self).__name__}.update: {len(predictions)} predictions but "
                f"{len(answers)} answer lists"
            )
        scores = [self._score(p, a) for p, a in zip(predictions, answers)]
        self.score_sum += sum(scores)
        self.count += len(predictions)
        if self.keep_scores:
            self.scores.append(torch.tensor(scores, dtype=torch.float64))

    def per_sample(self) -> Tensor:
        """(n,) float64: this process's per-sample scores, in update order (needs keep_scores=True)."""
        if not self.keep_scores:
            raise RuntimeError(f"{type(self).__name__}.per_sample() needs {type(self).__name__}(keep_scores=True)")
        return torch.cat(self.scores) if self.scores else torch.zeros(0, dtype=torch.float64)

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            # An empty evaluation is a wiring bug, not an accuracy of 0.
            raise RuntimeError(f"{type(self).__name__}.compute() called before any update()")
        return self.score_sum / self.count


class VQAAccuracy(_MeanScore):
    """lmms-eval VQAv2 accuracy: ``update(predictions: list[str], answers: list[list[str]])``.

    ``compute()`` returns the mean per-question score as a float64 scalar tensor, summed over
    processes (``dist_reduce_fx="sum"`` on ``score_sum`` and ``count``).
    """

    def _score(self, prediction: str, answers: Sequence[str]) -> float:
        return vqa_accuracy(prediction, answers)


class ExactMatchAccuracy(_MeanScore):
    """GQA-style accuracy: exact match after the same EvalAI normalisation.

    ``update(predictions: list[str], answers: list[str])``; an element of ``answers`` may also be a
    list of accepted strings (a match with any counts).
    """

    def _score(self, prediction: str, answers: Union[str, Sequence[str]]) -> float:
        return exact_match(prediction, answers)
