"""task: rl's pieces that need no model: the built-in rewards, a user's function named on failure,
advantages on hand-computed groups, prompt rows."""

import math

import pytest
import torch

from sftkit.config import ConfigError, load_config
from sftkit.data.sources import DataError
from sftkit.rewards import call, parse_rewards
from sftkit.tasks.rl import advantages, check, read_prompt_rows

from ..conftest import write_jsonl


def test_builtins_score_what_they_say():
    (em, nm, rx, ln) = parse_rewards([{"function": "exact_match"}, {"function": "number_match"},
                                      {"function": "regex", "pattern": r"^\d+$"}, {"function": "length", "target": 4}])
    completions = ["  42 ", "the answer is 1,024.", "forty-two", "12345678"]
    answers = ["42", "1024", "42", None]
    cols = {"answer": answers, "completion_ids": [[1] * 3, [1] * 8, [1] * 4, [1] * 9]}
    got = call(em, [""] * 4, completions, cols)
    assert got[:3] == [1.0, 0.0, 0.0] and math.isnan(got[3])  # None: not applicable
    got = call(nm, [""] * 4, completions, cols)
    assert got[:3] == [1.0, 1.0, 0.0] and math.isnan(got[3])
    assert call(rx, [""] * 4, completions, cols) == [0.0, 0.0, 0.0, 1.0]  # "  42 " has spaces around it
    assert call(ln, [""] * 4, completions, cols) == [-(5 - 4) / 4, -(20 - 4) / 4, -(9 - 4) / 4, -(8 - 4) / 4]
    # chat data: completions are message lists, as TRL passes them
    assert call(em, [[{"role": "user", "content": "q"}]], [[{"role": "assistant", "content": "42"}]],
                {"answer": ["42"]}) == [1.0]


def _boom(prompts, completions, **kw):
    return [1 / (len(c) - 3) for c in completions]  # ZeroDivisionError on a 3-character reply


def _short(prompts, completions, **kw):
    return [1.0]


def _nan(prompts, completions, **kw):
    return [float("nan")] * len(completions)


@pytest.mark.parametrize("fn,message", [
    ("_boom", r"reward _boom raised at row 1: ZeroDivisionError"),
    ("_short", r"reward _short: returned 1 values for 2 completions"),
    ("_nan", r"reward _nan: returned nan for row 0; a reward must be finite"),
])
def test_a_users_function_that_fails_is_named_with_its_row(fn, message):
    (reward,) = parse_rewards([{"function": f"tests.unit.test_rewards:{fn}"}])
    with pytest.raises(ConfigError, match=message):
        call(reward, ["a", "b"], ["long reply", "abc"], {}, where=lambda i: f"row {i}")


@pytest.mark.parametrize("spec,message", [
    ([], "give a list of rewards"),
    ([{"function": "exact"}], r"'exact' is not a built-in \(exact_match"),
    ([{"function": "nomodule_q:f"}], "cannot import f from nomodule_q"),
    ([{"function": "exact_match", "model": "x"}], r"expected \{function: NAME\} or \{model: REWARD_RUN\}"),
    ([{"function": "exact_match", "weight": "heavy"}], r"rl.rewards\[0\].weight: expected a number"),
    ([{"function": "regex"}], None),  # the pattern is checked when called
])
def test_reward_specs_are_checked_before_anything_runs(spec, message):
    if message is None:
        (r,) = parse_rewards(spec)
        with pytest.raises(ConfigError, match="give `pattern:`"):
            call(r, ["p"], ["c"], {})
        return
    with pytest.raises(ConfigError, match=message):
        parse_rewards(spec)


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])  # two groups of 4; the second all equal
    adv, zero = advantages(r, 2, "grpo", "group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()  # unbiased, as TRL
    torch.testing.assert_close(adv[:4], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (std + 1e-4))
    assert adv[4:].tolist() == [0.0] * 4 and zero.tolist() == [False] * 4 + [True] * 4
    adv, _ = advantages(r, 2, "dr_grpo", "none")
    assert adv.tolist() == [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]
    adv, _ = advantages(r, 2, "dapo", "batch")
    torch.testing.assert_close(adv[:4], (torch.tensor([1.0, 0, 0, 1]) - 0.5) / (r.std() + 1e-4))
    adv, _ = advantages(r, 2, "rloo", "group")  # reward minus the mean of the other three
    torch.testing.assert_close(adv[:4], torch.tensor([1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]))
    assert adv[4:].tolist() == [0.0] * 4


def test_unscorable_completions_get_no_advantage_and_no_nan():
    r = torch.tensor([1.0, float("nan"), 0.0, 1.0, float("nan"), float("nan"), float("nan"), float("nan")])
    for kind in ("grpo", "rloo"):
        adv, _ = advantages(r, 2, kind, "group")
        assert not torch.isnan(adv).any() and adv[1] == 0 and adv[4:].tolist() == [0.0] * 4
    adv, _ = advantages(r, 2, "grpo", "none")
    assert adv[:4].tolist() == pytest.approx([1 - 2 / 3, 0, -2 / 3, 1 - 2 / 3])  # the mean of the scored three


def test_prompt_rows_keep_columns_and_name_bad_rows(tmp_path):
    f = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2+2?", "answer": "4"},
                                           {"prompt": [{"role": "user", "content": "hi"}], "id": 7},
                                           {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]}])
    rows, skipped = read_prompt_rows(str(f), {})
    assert [r.columns for r in rows] == [{"answer": "4"}, {"id": 7}, {}] and skipped == 0
    assert [r.chat for r in rows] == [False, True, True] and rows[2].messages[0]["role"] == "system"
    for bad, message in (({"question": "x"}, r"p\.jsonl:1: prompt: missing field \(the row has question\)"),
                         ({"prompt": ""}, r"p\.jsonl:1: prompt: empty prompt"),
                         ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
                          r"p\.jsonl:1: prompt\[1\]: a prompt must end with a user turn")):
        write_jsonl(tmp_path / "p.jsonl", [bad])
        with pytest.raises(DataError, match=message):
            read_prompt_rows(str(tmp_path / "p.jsonl"), {})


@pytest.mark.parametrize("over,message", [
    ({"rl.loss": "ppo"}, "rl.loss: 'ppo' is not one of grpo, dr_grpo, dapo, rloo"),
    ({"rl.num_generations": 1}, "rl.num_generations: must be at least 2"),
    ({"rl.scale_rewards": "global"}, "rl.scale_rewards: 'global' is not one of group, batch, none"),
    ({"rl.temperature": 0}, "rl.temperature: must be > 0"),
    ({"data.pack": True}, "task: rl does not use data.pack"),
    ({"rl.rewards": []}, "rl.rewards: give a list of rewards"),
])
def test_rl_settings_are_checked_before_anything_is_written(over, message):
    cfg = load_config(None, {"task": "rl", "rl.rewards": [{"function": "number_match"}], **over})
    with pytest.raises(ConfigError, match=message):
        check(cfg)
