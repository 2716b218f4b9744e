"""Batched generation: the shared prompt prefix is run once and its KV cache reused, exactly."""

import pytest
import torch

from sftkit.data.render import Renderer
from sftkit.generate import generate, shared_prefix


def test_shared_prefix_leaves_each_prompt_a_token_of_its_own():
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5]], least=1) == 3
    assert shared_prefix([[1, 2, 3], [1, 2, 3, 4]], least=1) == 2  # the shorter one keeps its last token
    assert shared_prefix([[1, 2, 3], [9, 2, 3]], least=1) == 0
    assert shared_prefix([[1, 2, 3, 4]], least=1) == 0  # one prompt: nothing to share
    assert shared_prefix([[1, 2, 3, 4], [1, 2, 3, 5]], least=8) == 0


def sharpened(tokenizer):
    """A random tiny Llama whose greedy replies depend on the prompt: untied, with large initial weights
    (at the usual 0.02 its replies hardly depend on the prompt, so a wrong position would not show)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(config).eval()


@pytest.mark.filterwarnings("error::FutureWarning")  # no deprecated cache argument on the way
def test_reusing_the_shared_prefix_gives_the_replies_each_prompt_gets_alone(tokenizer):
    model = sharpened(tokenizer)
    renderer = Renderer(tokenizer, "auto", 512, "auto", "truncate")
    shots = []
    for i in range(3):
        shots += [{"role": "user", "content": f"Example {i}: what is {i} times {i}?"},
                  {"role": "assistant", "content": f"{i * i}"}]
    questions = ["What is 7 times 7?", "And 12?", "Tell me a long story about the number 40 and its friends", "9?"]
    prompts = [[{"role": "system", "content": "Answer briefly."}, *shots, {"role": "user", "content": q}]
               for q in questions]
    alone = [generate(model, renderer, [p], max_new_tokens=12, reuse_prefix=False)[0] for p in prompts]
    assert len(set(alone)) > 1, alone  # the replies differ, so a wrong position or mask would show
    assert generate(model, renderer, prompts, max_new_tokens=12, batch_size=3) == alone
    assert generate(model, renderer, prompts, max_new_tokens=12, batch_size=4, reuse_prefix=False) == alone


@pytest.mark.parametrize("template", ["chatml", "auto"])
def test_every_path_asks_for_a_reply_with_the_prompt_training_rendered(tokenizer, tmp_path, template):
    """data.system with a named template (or the tokenizer's own): training, eval, generate, best-of
    and chat all render a conversation through one function (Renderer._text, via with_system), so the
    model is asked exactly as it was trained, the system message included."""
    import io
    import json

    from sftkit.config import DataConfig
    from sftkit.data import renderer_for
    from sftkit.data.render import IGNORE
    from sftkit.data.sources import load_rows
    from sftkit.evaluate import evaluate_model
    from sftkit.generate import best_of_n, chat, generate_file, read_prompts

    from ..conftest import make_tiny_llama

    data_cfg = DataConfig(template=template, system="You answer in one word.", max_length=256)
    renderer = renderer_for(data_cfg, tokenizer)
    rows_file = tmp_path / "rows.jsonl"
    rows_file.write_text(json.dumps({"prompt": "hi", "completion": "hello"}) + "\n")
    row = load_rows(str(rows_file), system=data_cfg.system)[0]
    ex = renderer.render(row)
    trained_prompt = ex.input_ids[: next(i for i, y in enumerate(ex.labels) if y != IGNORE)]
    assert tokenizer.decode(trained_prompt).count("You answer in one word.") == 1

    model = make_tiny_llama(tokenizer)
    asked = []
    plain_generate = model.generate

    def recording(*args, **kw):
        ids, mask = kw["input_ids"], kw["attention_mask"]
        asked.extend(r[m.bool()].tolist() for r, m in zip(ids, mask))
        return plain_generate(*args, **kw)

    model.generate = recording
    paths = {
        "eval": lambda: evaluate_model(model, renderer, [row], ["exact_match"], loss=False, max_new_tokens=2),
        "generate": lambda: generate_file(model, renderer, read_prompts(str(rows_file)), str(tmp_path / "o.jsonl"),
                                          max_new_tokens=2, batch_size=1),
        "best-of": lambda: best_of_n(model, renderer, read_prompts(str(rows_file)), lambda items: [0.0] * len(items),
                                     2, str(tmp_path / "b.jsonl"), None, max_new_tokens=2, batch_size=1, temperature=1.0),
        "chat": lambda: chat(model, tokenizer, data_cfg, max_new_tokens=2, stdin=io.StringIO("hi\n/exit\n"),
                             stdout=io.StringIO()),
    }
    for name, run in paths.items():
        asked.clear()
        run()
        assert asked and all(a == trained_prompt for a in asked), (name, tokenizer.decode(asked[0]))


def test_a_row_seeded_reply_depends_on_its_seed_alone_not_on_the_rows_beside_it(tokenizer):
    """row_seeds: each reply sampled from its own stream, so it is the same alone or in any batch
    (what lets two processes sample what one would)."""
    from sftkit.generate import generate_ids

    model = sharpened(tokenizer)
    renderer = Renderer(tokenizer, "auto", 512, "auto", "truncate")
    prompts = [[{"role": "user", "content": q}] for q in ("Count to five", "Name a colour", "Hi", "What is 2+2?")]
    kw = dict(temperature=1.3, top_p=0.95)
    together = generate_ids(model, renderer, prompts, 12, batch_size=4, row_seeds=[10, 11, 12, 13], **kw)
    for i in range(4):
        assert generate_ids(model, renderer, [prompts[i]], 12, row_seeds=[10 + i], **kw) == [together[i]]
    reordered = generate_ids(model, renderer, prompts[::-1], 12, batch_size=2, row_seeds=[13, 12, 11, 10], **kw)
    assert reordered == together[::-1]
    again = generate_ids(model, renderer, prompts, 12, batch_size=4, row_seeds=[20, 21, 22, 23], **kw)
    assert again != together  # another seed, another sample


def test_the_row_sampler_draws_from_the_tempered_nucleus():
    """Gumbel-max over logits / temperature within the top-p nucleus: the frequencies of many draws
    are the renormalised probabilities, tokens outside the nucleus never drawn."""
    from sftkit.generate import RowSampler

    logits = torch.tensor([2.0, 1.0, 0.5, -1.0, -3.0])
    n = 20000
    sampler = RowSampler(list(range(n)), temperature=0.7, top_p=0.9, device="cpu")
    draws = sampler(None, logits.expand(n, -1)).argmax(-1)
    p = (logits / 0.7).softmax(-1)
    keep = (p.cumsum(-1) - p) < 0.9  # sorted already: the likeliest tokens until 0.9 is reached
    want = torch.where(keep, p, 0) / p[keep].sum()
    got = torch.bincount(draws, minlength=5).float() / n
    assert torch.allclose(got, want, atol=0.01), (got, want)
    assert got[~keep].sum() == 0


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_copies_of_a_prompt_share_one_prompt_pass_and_get_the_replies_they_get_alone(tokenizer, reuse_prefix):
    """task: rl samples each prompt num_generations times in one batch: the prompt is run once for
    all its copies (with or without a shared prefix cached), each copy still sampled from its own seed."""
    from sftkit.generate import generate_ids

    model = sharpened(tokenizer)
    renderer = Renderer(tokenizer, "auto", 512, "auto", "truncate")
    prompts = [[{"role": "user", "content": q}] for q in ("Count to five", "Name a colour please")]
    batch = [p for p in prompts for _ in range(4)]
    seeds = list(range(100, 108))
    kw = dict(temperature=1.3, top_p=0.95, reuse_prefix=reuse_prefix)
    together = generate_ids(model, renderer, batch, 10, batch_size=8, row_seeds=seeds, **kw)
    assert len(set(map(tuple, together))) > 2, together  # the seeds give different samples
    for i in range(8):
        assert generate_ids(model, renderer, [batch[i]], 10, row_seeds=[seeds[i]], **kw) == [together[i]]

    fed = []
    hook = model.model.embed_tokens.register_forward_hook(lambda m, args, out: fed.append(args[0].numel()))
    generate_ids(model, renderer, [prompts[0]] * 6, 1, batch_size=6, row_seeds=list(range(6)), **kw)
    hook.remove()
    n = len(renderer.prompt_ids(prompts[0]))
    assert sum(fed) == (n - 1) + 6, fed  # the prompt once (but its last token), then one token per copy


def test_a_lora_model_decodes_with_its_adapter_folded_in_and_its_weights_untouched(tokenizer):
    from peft import LoraConfig, get_peft_model

    from sftkit.generate import generate_ids
    from sftkit.lora import use_fused_lora

    base = sharpened(tokenizer)
    renderer = Renderer(tokenizer, "auto", 512, "auto", "truncate")
    prompts = [[{"role": "user", "content": q}] for q in ("Count to five", "Name a colour", "Hi", "What is 2+2?")]
    plain = generate_ids(base, renderer, prompts, 12, batch_size=4)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    use_fused_lora(config)
    model = get_peft_model(base, config)
    torch.manual_seed(3)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seen = set()  # per call of an adapted layer: (adapter run beside the weight, weight the original one)
    layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    original = {id(m): m.base_layer.weight for m in layers}
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.add((not m.disable_adapters,
                                                                m.base_layer.weight is original[id(m)])))
             for m in layers]
    unmerged = generate_ids(model, renderer, prompts, 12, batch_size=4, fast=False)
    assert unmerged != plain  # the adapter changes the replies, so leaving it out would show
    assert seen == {(True, True)}
    seen.clear()
    assert generate_ids(model, renderer, prompts, 12, batch_size=4) == unmerged
    assert seen == {(False, False)}, "the adapters are folded into copies of the weights, not run beside them"
    for h in hooks:
        h.remove()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert all(p is not None for p in model.parameters())
    with model.disable_adapter():  # the reference (adapter off) is not merged into
        assert generate_ids(model, renderer, prompts, 12, batch_size=4) == plain
    model.train()
    out = model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]]))
    out.loss.backward()  # training goes on through the adapter, which still gets its gradient
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)
