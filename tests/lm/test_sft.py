"""SFT batches: the response reaches the model, the loss never falls on the prompt or on padding."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from nncift.lm.sft import IGNORE, PLAIN_TEMPLATE, PromptFormatter, collate


@pytest.fixture(scope="module")
def tok(tiny_lm):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_lm)


def test_collate_masks_prompt_and_padding_by_position():
    eos = 9  # the pad id is also the EOS id, as in most chat models: masking must go by position
    b = collate([[1, 2, 3, 4, eos], [5, 6, eos]], [2, 1], pad_id=eos)
    np.testing.assert_array_equal(b.input_ids, [[1, 2, 3, 4, eos], [5, 6, eos, eos, eos]])
    np.testing.assert_array_equal(b.attention_mask, [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(b.labels, [[IGNORE, IGNORE, 3, 4, eos], [IGNORE, 6, eos, IGNORE, IGNORE]])


def test_examples_are_prompt_response_eos_with_only_the_response_scored(tok):
    fmt = PromptFormatter(tok, "auto", max_prompt_tokens=64, max_seq_len=128)
    assert not fmt.chat  # the byte tokenizer has no chat template: the plain template is used
    b = fmt.batch(["sort a list", "hi"], ["use sorted(x)", "hello there, friend"])
    for i, (p, r) in enumerate([("sort a list", "use sorted(x)"), ("hi", "hello there, friend")]):
        real = b.input_ids[i][b.attention_mask[i] == 1]
        prompt = tok(PLAIN_TEMPLATE.format(prompt=p), add_special_tokens=False)["input_ids"]
        resp = tok(r, add_special_tokens=False)["input_ids"]
        assert real.tolist() == [*prompt, *resp, tok.eos_token_id]
        scored = b.labels[i][b.labels[i] != IGNORE]
        assert scored.tolist() == [*resp, tok.eos_token_id]
        assert (b.labels[i][: len(prompt)] == IGNORE).all()
        assert (b.labels[i][b.attention_mask[i] == 0] == IGNORE).all()


def test_truncation_keeps_the_template_and_the_final_eos(tok):
    fmt = PromptFormatter(tok, "Q: {prompt}\nA: ", max_prompt_tokens=10, max_seq_len=24)
    seqs, n_prompt = fmt.examples(["x" * 50], ["y" * 50])
    text = tok.decode(seqs[0][: n_prompt[0]])
    assert text == "Q: " + "x" * 10 + "\nA: "
    assert len(seqs[0]) == 24 and seqs[0][-1] == tok.eos_token_id


def test_chat_template_is_used_when_present(tok):
    tok = copy.deepcopy(tok)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    fmt = PromptFormatter(tok, "auto")
    assert fmt.chat and tok.decode(fmt.prompt_ids(["hey"])[0]) == "<user>hey<assistant>"
    with pytest.raises(ValueError, match=r"contain '\{prompt\}'"):
        PromptFormatter(tok, "no placeholder")


def test_model_loss_is_the_mean_over_response_tokens_only(tiny_lm, tok):
    """The HF loss with these labels equals a hand computation over response + EOS positions."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm).eval()
    fmt = PromptFormatter(tok, "auto", 64, 128)
    b = fmt.batch(["sort a list", "hi"], ["use sorted(x)", "hello there, friend"]).to_torch()
    with torch.no_grad():
        out = model(**b)
        logp = torch.log_softmax(out.logits[:, :-1].float(), -1)
    labels = b["labels"][:, 1:]
    mask = labels != IGNORE
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    assert float(out.loss) == pytest.approx(float(nll[mask].mean()), rel=1e-5)
    # changing a padding position or a prompt token's label never changes what is scored
    assert int(mask.sum()) == sum(len(tok(r)["input_ids"]) + 1 for r in ["use sorted(x)", "hello there, friend"])
