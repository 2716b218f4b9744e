"""Self-instruct filters (sftkit.synth): each rejects what it should, with its reason, and passes the rest."""

import pytest

from sftkit.data.quality import NearIndex
from sftkit.data.sources import Row
from sftkit.synth import (
    Candidate,
    Pool,
    clean_instruction,
    eval_problem,
    initial_pool,
    instruction_problem,
    row_filters,
    seed_tasks,
)


def chat(user, reply="", source="eval.jsonl", line=1):
    msgs = [{"role": "user", "content": user}] + ([{"role": "assistant", "content": reply}] if reply else [])
    return Row(msgs, source, line, "messages", n_prompt=1)


@pytest.mark.parametrize("raw,want", [
    ("4. Write a poem about cats.\n5. Name a colour.", "Write a poem about cats."),
    ('Task 4: "Name two fruits that are red."', "Name two fruits that are red."),
    ("  List three rivers in Europe.\n\nAnswer: Rhine", "List three rivers in Europe."),
    ("- Describe a sunset in one sentence.", "Describe a sunset in one sentence."),
    ("One new task: Name a bird that cannot fly.", "Name a bird that cannot fly."),
    ("Write task 4: Explain what rain is.", "Explain what rain is."),
    ("4. One new task: Explain what snow is.", "Explain what snow is."),
])
def test_the_written_task_is_cut_to_the_task(raw, want):
    assert clean_instruction(raw) == want


def test_instruction_filters_reject_with_the_paper_rules():
    assert instruction_problem("Say hi") == "length: 2 words (fewer than 3)"
    assert instruction_problem(" ".join(["word"] * 151)) == "length: 151 words (more than 150)"
    assert instruction_problem("Draw a cat sitting on a mat.").startswith("unsuitable: mentions 'draw'")
    assert instruction_problem("Describe the image below in detail.").startswith("unsuitable: mentions 'image'")
    assert instruction_problem("123 reasons to double a number") == "form: starts with '1', not a letter"
    assert instruction_problem("Name three fruits that are yellow.") is None
    assert instruction_problem("Explain what a profile is.") is None  # 'file' only as a word, not inside one


def test_rouge_l_against_the_pool_rejects_a_close_task_and_names_it():
    pool = Pool([("rhyme", "Give three words that rhyme with the word below."),
                 ("capital", "What is the capital city of the country below?")])
    reason = pool.too_close("Give three words that rhyme with the word below, please.")
    assert reason is not None and reason.startswith("rouge-l: 0.9") and "against rhyme (limit 0.7)" in reason
    assert pool.too_close("Write a limerick about a cat who loves the sea.") is None
    pool.add("synth:3", "Write a limerick about a cat who loves the sea.")
    assert "against synth:3" in pool.too_close("Write a limerick about a dog who loves the sea.")


def test_eval_rows_are_kept_out_near_duplicates_and_13_grams():
    long = ("the quick brown fox jumps over the lazy dog while the farmer watches from the old wooden fence "
            "near the river")
    index = NearIndex([chat("What is the capital of France?", "Paris.", line=1),
                       chat("Continue the story.", long, line=2)])
    assert eval_problem(index, chat("What is the capital of France", "Paris")) == "eval: a near duplicate of eval.jsonl:1"
    shared = "Tell me a story: " + " ".join(long.split()[2:16]) + " and then something else entirely happens today"
    assert eval_problem(index, chat(shared, "ok")) == "eval: shares a 13-gram with eval.jsonl:2"
    assert eval_problem(index, chat("Name a red fruit.", "A strawberry.")) is None


def test_row_filters_reject_lint_problems_and_eval_overlap(tokenizer):
    index = NearIndex([chat("What is the capital of France?", "Paris.")])
    cands = [Candidate(0, [], instruction="Name a red fruit.", answer="A strawberry."),
             Candidate(1, [], instruction="Write a story about a dragon.", answer="I'm sorry, but as an AI language model I cannot do that."),
             Candidate(2, [], instruction="Repeat after me: hello there", answer="Repeat after me: hello there"),
             Candidate(3, [], instruction="Say one word about the sea.", answer=""),
             Candidate(4, [], instruction="What is the capital of France?", answer="Paris.")]
    row_filters(cands, tokenizer, 256, index)
    assert [c.reason for c in cands] == [None, "lint: boilerplate refusal", "lint: reply repeats the prompt",
                                         "lint: empty or very short reply", "eval: a near duplicate of eval.jsonl:1"]


def test_a_task_that_echoes_the_request_is_rejected():
    from pathlib import Path

    seeds = seed_tasks(str(Path(__file__).resolve().parents[2] / "examples" / "synth" / "seed_tasks.jsonl"))
    pool = initial_pool(seeds)
    assert pool.too_close("Here are some tasks a user might give an assistant:").endswith("against the request (limit 0.7)")
    assert pool.too_close("One new task, different from these.").endswith("against the request (limit 0.7)")
    assert "against rhyme" in pool.too_close("Give three words that rhyme with the word below.\nlight")
    assert pool.too_close("Name a bird that cannot fly.") is None
