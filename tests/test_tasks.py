"""The task registry: each task's evaluate against values computed by hand, with stand-in predictors."""

from __future__ import annotations

import pytest
import torch

from vldistill.tasks import TASKS, answer_prior, get_task, hypothesis_only_baseline
from vldistill.tasks.predict import _zeroshot_vqa, task_predictor


def test_registered_tasks_and_their_declarations():
    assert {"zeroshot", "retrieval", "vqa", "captioning", "entailment", "multiple_choice"} <= set(TASKS.names())
    vqa = get_task("vqa")
    assert (vqa.sample_kind, vqa.teacher_fields, vqa.targets) == ("vqa", ("question", "qa"), ("answer",))
    assert get_task("entailment").teacher_fields == ("hypothesis",)
    assert get_task("multiple_choice").sample_kind == "multiple_choice"
    with pytest.raises(KeyError, match="unknown task 'vqa2'"):
        get_task("vqa2")


def _vqa(question_type: str, answers: list[str], answer: str | None = None) -> dict:
    return {
        "kind": "vqa",
        "question": "q",
        "answers": answers,
        "answer": answer or answers[0],
        "question_type": question_type,
    }


def test_vqa_accuracy_overall_and_by_type_by_hand():
    data = [
        _vqa("colour", ["red"]),  # one reference: exact match after normalisation ("Red." -> "red")
        _vqa("colour", ["blue"]),
        _vqa("yes_no", ["yes"] * 2 + ["no"] * 8),  # 10 references, 2 say "yes": official leave-one-out mean
    ]
    predictions = ["Red.", "green", "yes"]
    result = get_task("vqa").evaluate(lambda items: [predictions[data.index(i)] for i in items], data, batch_size=2)
    # "yes" among 10 refs with 2 "yes": 8 subsets keep both (min(2/3,1)), 2 subsets keep one (1/3): (8*2/3+2/3)/10
    yes_no = (8 * 2 / 3 + 2 * 1 / 3) / 10
    assert result["by_type"] == pytest.approx({"colour": 0.5, "yes_no": yes_no})
    assert result["accuracy"] == pytest.approx((1 + 0 + yes_no) / 3)
    assert result["count"] == 3


def test_answer_prior_is_the_most_frequent_answer_of_each_question_type():
    train = [_vqa("colour", ["red"]), _vqa("colour", ["red"]), _vqa("colour", ["blue"]), _vqa("yes_no", ["no"])]
    prior = answer_prior(train)
    assert prior([_vqa("colour", ["x"]), _vqa("yes_no", ["x"]), _vqa("shape", ["x"])]) == ["red", "no", "red"]


def test_entailment_accuracy_and_the_hypothesis_only_model():
    train = [
        {"hypothesis": "there is a red circle", "label": 0},
        {"hypothesis": "the circle is made of wood", "label": 1},
        {"hypothesis": "there is a blue square", "label": 2},
        {"hypothesis": "the square is made of wood", "label": 1},
    ]
    test = [
        {"hypothesis": "a wooden thing made of wood", "label": 1},
        {"hypothesis": "there is a red thing", "label": 0},
    ]
    result = get_task("entailment").evaluate(lambda items: [0 for _ in items], test, train=train)
    assert result["accuracy"] == 0.5
    # "made of wood" only ever appears in neutral training hypotheses: the text alone gives the first one away
    assert hypothesis_only_baseline(train)(test[:1]) == [1]
    assert result["hypothesis_only_accuracy"] == 1.0


def test_multiple_choice_q2a_qa2r_q2ar_by_hand():
    data = [
        {"answer_index": 0, "rationale_index": 1},
        {"answer_index": 2, "rationale_index": 0},
        {"answer_index": 1, "rationale_index": 1},
    ]
    preds = [(0, 1), (2, 1), (0, 1)]  # answers right: 2/3; rationales right: 2/3; both right: 1/3
    result = get_task("multiple_choice").evaluate(lambda items: [preds[data.index(i)] for i in items], data)
    assert result["q2a"] == pytest.approx(2 / 3)
    assert result["qa2r"] == pytest.approx(2 / 3)
    assert result["q2ar"] == pytest.approx(1 / 3)
    only_answers = get_task("multiple_choice").evaluate(lambda items: [p[0] for p in preds], data)
    assert only_answers["q2a"] == pytest.approx(2 / 3) and "q2ar" not in only_answers


def test_captioning_scores_generated_captions_against_the_references():
    data = [{"captions": {"en": "a red circle on white"}}, {"captions": {"en": "a blue square on white"}}]
    perfect = get_task("captioning").evaluate(lambda items: [i["captions"]["en"] for i in items], data)
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    wrong = get_task("captioning").evaluate(lambda items: ["green triangle" for _ in items], data)
    assert wrong["bleu4"] < 1e-6 and wrong["cider"] == 0.0


def test_a_predictor_that_returns_the_wrong_number_of_predictions_is_an_error():
    with pytest.raises(ValueError, match="returned 1 predictions for 2 samples"):
        get_task("vqa").evaluate(lambda items: ["red"], [_vqa("colour", ["red"])] * 2)
    with pytest.raises(ValueError, match="evaluation data is empty"):
        get_task("vqa").evaluate(lambda items: [], [])


class _CountingDualEncoder(torch.nn.Module):
    """A dual encoder whose embeddings are fixed functions of the image number and the text, counting text calls."""

    kind = "dual_encoder"

    def __init__(self):
        super().__init__()
        self.text_calls = 0

    def embed_images(self, images):
        return torch.stack([torch.tensor([float(i % 3), float(i % 5), 1.0]) for i in images])

    def embed_texts(self, texts):
        self.text_calls += 1
        return torch.stack([torch.tensor([len(t) % 3, sum(map(ord, t)) % 5, 0.5], dtype=torch.float) for t in texts])


def test_zero_shot_vqa_embeds_each_question_once_and_answers_as_without_the_cache():
    answers = ["yes", "no", "red", "circle"]
    samples = [{"image": i, "question": f"question {i % 3}?"} for i in range(10)]

    def expected(model, s):  # the definition: the answer whose "question answer" text is closest to the image
        texts = model.embed_texts([f"{s['question']} {a}" for a in answers])
        return answers[int((texts @ model.embed_images([s["image"]])[0]).argmax())]

    model = _CountingDualEncoder()
    predict = task_predictor(model, "vqa", answers)
    got = predict(samples[:6]) + predict(samples[6:])
    assert model.text_calls == 3  # three distinct questions over two batches
    assert got == [expected(_CountingDualEncoder(), s) for s in samples]
    # a cache of one question's embeddings: the least recently used goes, the answers stay the same
    small = _CountingDualEncoder()
    assert _zeroshot_vqa(small, answers, cache_floats=len(answers) * 3)(samples) == got
    assert small.text_calls == 10  # the questions alternate, so each sample embeds its own again
