"""The lmms-eval plugin against the real lmms-eval package (CI installs it with --no-deps): entry point,
registry, instantiation from model args, the three request types as lmms-eval builds them, our answer
extraction against lmms-eval's own functions, and `python -m lmms_eval --model videoxl2` end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points

import pytest
import torch

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install --no-deps lmms-eval)")

from lmms_eval.api.instance import Instance  # noqa: E402

from videoxl2.engine.session import VideoSession  # noqa: E402
from videoxl2.errors import InputError  # noqa: E402
from videoxl2.eval.lmms_plugin import VideoXL2, continuation_logprob  # noqa: E402

GEN = {
    "max_new_tokens": 4,
    "temperature": 0,
    "top_p": 1.0,
    "num_beams": 1,
    "do_sample": False,
    "until": ["\n\n"],
}


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    from videoxl2.video.synthetic import write_synthetic_video

    folder = tmp_path_factory.mktemp("lmms")
    return [
        str(write_synthetic_video(folder / f"v{i}.mp4", num_frames=12, fps=4.0, size=(32, 32), seed=i))
        for i in range(2)
    ]


@pytest.fixture(scope="module")
def lm(tiny_checkpoint):
    from lmms_eval.models import get_model

    # as lmms-eval's evaluator does: model_args string plus its own extra config
    return get_model("videoxl2").create_from_arg_string(
        f"pretrained={tiny_checkpoint},max_frames_num=8,fps=1,max_fps=4", {"batch_size": 1, "device": "cpu"}
    )


def request(kind: str, args: tuple, doc_id: int) -> Instance:
    return Instance(kind, args, idx=0, metadata={"task": "tiny", "doc_id": doc_id, "repeats": 1})


def to_visual(doc):
    return [doc["video"]]


def direct_answer(lm, video, question, max_new_tokens=4):
    session = VideoSession.from_path(
        lm.model, lm.tokenizer, video, max_num_frames=8, sample_fps=1.0, max_sample_fps=4.0, progress=False
    )
    return session.ask(question, generation_config={"max_new_tokens": max_new_tokens})


def test_entry_point_and_registry_resolve_our_class():
    from lmms_eval.models import AVAILABLE_MODELS, get_model

    found = {ep.name: ep for ep in entry_points(group="lmms_eval.models")}
    assert found["videoxl2"].value == "videoxl2.eval.lmms_plugin:manifest"
    manifest = found["videoxl2"].load()()
    assert manifest.model_id == "videoxl2" and manifest.simple_class_path.endswith("lmms_plugin.VideoXL2")
    assert get_model("videoxl2") is VideoXL2 and AVAILABLE_MODELS["videoxl2"] == "VideoXL2"


def test_generate_until_answers_like_the_engine(lm, videos):
    docs = [{"video": videos[0]}, {"video": videos[1]}, {"video": videos[0]}]
    lm.task_dict = {"tiny": {"test": docs}}
    questions = ["What colour is it?", "What moves?", "How many squares?"]
    requests = [
        request("generate_until", (q, dict(GEN), to_visual, i, "tiny", "test"), i)
        for i, q in enumerate(questions)
    ]
    answers = lm.generate_until(requests)
    assert answers == [direct_answer(lm, docs[i]["video"], q).text for i, q in enumerate(questions)]
    assert lm.rank == 0 and lm.world_size == 1 and lm.device.type == "cpu"


def test_generate_until_multi_round(lm, videos):
    def next_round(doc, previous_output, round_idx, previous_round_info):
        if round_idx == 2:
            return None, None, True, previous_output, previous_round_info
        return [doc["video"]], f"And after that ({round_idx})?", False, previous_output, {"round": round_idx}

    lm.task_dict = {"tiny": {"test": [{"video": videos[1]}]}}
    args = ("What happens first?", dict(GEN), to_visual, next_round, 0, "tiny", "test")
    [rounds] = lm.generate_until_multi_round([request("generate_until_multi_round", args, 0)])
    assert rounds == (
        direct_answer(lm, videos[1], "What happens first?").text,
        direct_answer(lm, videos[1], "And after that (1)?").text,
    )


def test_loglikelihood_equals_a_full_forward(lm, videos):
    """The continuation's log-probability from the engine's cache = from one forward over everything."""
    question, continuation = "What colour is it?", " red and blue"
    lm.task_dict = {"tiny": {"test": [{"video": videos[0]}]}}
    [(logprob, greedy)] = lm.loglikelihood(
        [request("loglikelihood", (question, continuation, to_visual, 0, "tiny", "test"), 0)]
    )
    session = VideoSession.from_path(
        lm.model,
        lm.tokenizer,
        videos[0],
        max_num_frames=8,
        sample_fps=1.0,
        max_sample_fps=4.0,
        progress=False,
    )
    session.prefill()
    target = lm.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.cat([session.layout.input_ids[: session.layout.video_end], session.question_ids(question)])
    full = torch.cat([ids, torch.tensor(target)])
    with torch.inference_mode():
        embeds = torch.cat(list(session.iter_group_embeddings()))
        logits = lm.model.language_model(inputs_embeds=lm.model.embed_inputs(full, embeds)[None]).logits[0]
    scores = logits[len(ids) - 1 : -1].float().log_softmax(-1)
    expected = scores[torch.arange(len(target)), torch.tensor(target)].sum().item()
    assert logprob == pytest.approx(expected, abs=1e-3)
    assert greedy == bool((scores.argmax(-1) == torch.tensor(target)).all())
    # what greedy decoding produces is, token for token, greedy
    answer = direct_answer(lm, videos[0], question, max_new_tokens=3)
    text = lm.tokenizer.decode(answer.token_ids)
    if lm.tokenizer(text, add_special_tokens=False)["input_ids"] == answer.token_ids:
        assert continuation_logprob(session, question, text)[1] is True


def test_extraction_equals_lmms_eval_functions():
    from lmms_eval.tasks._task_utils.mcq_extract import extract_mcq_answer
    from lmms_eval.tasks.charades_sta.utils import extract_time, iou

    from videoxl2.eval.scoring import mcq_letter, parse_span, temporal_iou

    answers = [
        "The answer is (B).", "b", "none of them", "", "B", "D. Four", "(A) One", "Answer: C", "A:",
        "答案是B", "I choose C because A is wrong.", "The best option is D", "C) blue", "xyz A", "'D',",
        "B, C or D?",
        "The correct option is B, not C.", "E", "Option A. The answer is B", "  (C)  ",
    ]  # fmt: skip
    assert [mcq_letter(a) for a in answers] == [extract_mcq_answer(a, choices=list("ABCD")) for a in answers]
    spans = [
        "The event happens in 2.0 - 4.0 seconds.", "It happens from 0:01 to 0:03.",
        "starts at 5 and ends at 7",
        "The event starts at 5 seconds.\nIt ends at 7 seconds.", "happens in 9.5-3", "none", "", "12s - 20s",
        "The event starts at 00:00:12 and ends at 00:00:20.", "1:02:03 - 1:02:09 start", "at 3 to 4.5 s",
        "The start time is 3.2, end time is 7.9", "A specific example is : 20.8 - 30.0 seconds, start 1 - 2",
    ]  # fmt: skip
    for text in spans:
        theirs = extract_time(text)
        assert parse_span(text) == (tuple(theirs[0]) if theirs else None), text
    for a, b in [((2, 4), (2, 4)), ((2, 4), (1, 3)), ((0, 1), (2, 3)), ((1, 1), (1, 1)), ((0, 10), (3, 4))]:
        assert temporal_iou(a, b) == iou(a, b)


def test_python_m_lmms_eval_runs_our_model(tmp_path, videos, tiny_checkpoint):
    """The real CLI with a local task (JSON docs, our videos): lmms-eval loads videoxl2 through the entry
    point, answers with it, and writes its results."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    docs = [{"video": videos[i % 2], "question": f"What is shown ({i})?", "answer": "A"} for i in range(3)]
    (tmp_path / "docs.json").write_text(json.dumps(docs))
    (tasks / "tiny_task_utils.py").write_text(
        "def doc_to_visual(doc):\n    return [doc['video']]\n\n\n"
        "def doc_to_text(doc, lmms_eval_specific_kwargs=None):\n    return doc['question']\n\n\n"
        "def process_results(doc, results):\n"
        "    return {'exact': float(results[0].strip() == doc['answer'])}\n"
    )
    (tasks / "videoxl2_tiny.yaml").write_text(
        "task: videoxl2_tiny\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {tmp_path / 'docs.json'}\ntest_split: test\noutput_type: generate_until\n"
        "doc_to_visual: !function tiny_task_utils.doc_to_visual\n"
        "doc_to_text: !function tiny_task_utils.doc_to_text\ndoc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 4\n  temperature: 0\n  do_sample: false\n"
        "process_results: !function tiny_task_utils.process_results\n"
        "metric_list:\n  - metric: exact\n    aggregation: mean\n    higher_is_better: true\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}  # fmt: skip
    command = [
        sys.executable, "-m", "lmms_eval", "--model", "videoxl2",
        "--model_args", f"pretrained={tiny_checkpoint},max_frames_num=8", "--tasks", "videoxl2_tiny",
        "--include_path", str(tasks), "--batch_size", "1", "--output_path", str(tmp_path / "out"),
        "--log_samples",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    written = list((tmp_path / "out").rglob("*_samples_videoxl2_tiny.jsonl"))
    assert len(written) == 1, (done.stdout + done.stderr)[-3000:]
    [samples] = written
    logged = sorted(
        (json.loads(line) for line in samples.read_text().splitlines()), key=lambda s: s["doc_id"]
    )
    assert len(logged) == 3
    [results] = list((tmp_path / "out").rglob("*_results.json"))
    assert "videoxl2_tiny" in json.loads(results.read_text())["results"]
    model = VideoXL2(pretrained=str(tiny_checkpoint), max_frames_num=8)
    for sample, doc in zip(logged, docs):
        assert sample["input"] == doc["question"]
        assert sample["filtered_resps"] == direct_answer(model, doc["video"], doc["question"]).text


def test_rerotate_model_arg_is_parsed_strictly(tiny_checkpoint):
    """lmms-eval passes model args as text: "False" must mean false, and a typo must not pass silently."""
    assert VideoXL2(pretrained=str(tiny_checkpoint), rerotate="False").settings.rerotate is False
    assert VideoXL2(pretrained=str(tiny_checkpoint), rerotate=True).settings.rerotate is True
    assert VideoXL2(pretrained=str(tiny_checkpoint)).settings.rerotate is True
    with pytest.raises(InputError, match="rerotate must be true or false"):
        VideoXL2(pretrained=str(tiny_checkpoint), rerotate="ture")
