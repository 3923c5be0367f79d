"""SelectIT teacher: the three reflection levels on hand-made numbers, the rating-token probabilities against a
direct full-vocabulary calculation, batching, config validation and resolution."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nncift.errors import ConfigError
from nncift.influence.interface import Items
from nncift.influence.selectit import (
    ANSWER_CUE,
    CHAT_ANSWER_PREFIX,
    RATING_PROMPTS,
    SelectIT,
    SelectITConfig,
    build_selectit,
    model_level,
    rating_token_ids,
    sentence_level,
    token_level,
)
from nncift.lm.models import load_causal_lm


def _items(n: int = 5) -> Items:
    prompts = ["sum of two", "alpha beta gamma delta is", "I", "cats runs fast of two cats", "beta"]
    responses = ["two", "delta", "alpha beta beta gamma I is fast", "I", "gamma gamma of"]
    prompts, responses = (prompts * 2)[:n], (responses * 2)[:n]
    return Items(prompts, responses, np.zeros((n, 4), np.float32), [f"r{i}" for i in range(n)])


@pytest.fixture(scope="module")
def tiny(tiny_lm):
    return load_causal_lm(tiny_lm)


@pytest.fixture(scope="module")
def peaked(tiny_lm):
    """The tiny random Llama with its LM head scaled up, so that next-token probabilities are peaked (a random
    LM gives near-uniform P', where a 1e-5 tolerance would test little)."""
    model, tok = load_causal_lm(tiny_lm)
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)
    return model, tok


def _direct_probs(model, tok, texts: list[str], scale: int, special: bool = True) -> np.ndarray:
    """One unpadded forward per text, softmax over the whole vocabulary at the last position, the K rating
    tokens picked and renormalised."""
    rating = [tok(str(k), add_special_tokens=False)["input_ids"][0] for k in range(1, scale + 1)]
    out = []
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tok(text, add_special_tokens=special)["input_ids"]])
            p = torch.softmax(model(input_ids=ids).logits[0, -1].double(), dim=-1)[rating]
            out.append((p / p.sum()).numpy())
    return np.array(out)


# ---------------------------------------------------------------------------------------------- formulas
def test_token_level_hand_values():
    p = np.array(
        [
            [0.1, 0.2, 0.4, 0.2, 0.1],  # S_base 3; sum|P'_i - 0.4| = .3+.2+0+.2+.3 = 1.0; 3 * 1.0/4
            [0.6, 0.1, 0.1, 0.1, 0.1],  # S_base 1; 4 * 0.5 = 2.0; 1 * 2.0/4
            [0.0, 0.0, 0.0, 0.0, 1.0],  # S_base 5; 4 * 1.0; 5 * 4/4
            [0.2, 0.2, 0.2, 0.2, 0.2],  # no margin: 0
            [0.4, 0.4, 0.2, 0.0, 0.0],  # tie -> lowest score (np.argmax): S_base 1; 0+0+.2+.4+.4 = 1.0; 1 * 1/4
        ]
    )
    np.testing.assert_allclose(token_level(p), [0.75, 0.5, 5.0, 0.0, 0.25], atol=1e-12)
    # K = 3: S_base 3; |.2-.5| + |.3-.5| = 0.5; 3 * 0.5/2
    np.testing.assert_allclose(token_level(np.array([0.2, 0.3, 0.5])), 0.75, atol=1e-12)
    # leading axes are kept: (2, 1, 5) -> (2, 1)
    assert token_level(p[:2, None, :]).shape == (2, 1)


def test_sentence_level_hand_values():
    s_token = np.array([[1.0, 2.0, 0.5], [2.0, 2.0, 0.5], [3.0, 2.0, 0.5]])  # (3 prompts, 3 items)
    # item 0: mean 2, population std sqrt(((1-2)^2 + 0 + (3-2)^2) / 3) = sqrt(2/3); item 1, 2: std 0
    expected = [2.0 / (1.0 + 0.2 * math.sqrt(2.0 / 3.0)), 2.0, 0.5]
    np.testing.assert_allclose(sentence_level(s_token, 0.2), expected, atol=1e-12)
    np.testing.assert_allclose(sentence_level(s_token, 0.0), [2.0, 2.0, 0.5], atol=1e-12)  # alpha 0: the mean
    # alpha 1, item 0: 2 / (1 + 0.8164965809277261)
    np.testing.assert_allclose(sentence_level(s_token, 1.0)[0], 2.0 / 1.8164965809277261, atol=1e-12)
    with pytest.raises(ValueError):
        sentence_level(np.array([1.0, 2.0]))


def test_model_level_hand_values():
    s_sent = np.array([[1.0, 2.0], [3.0, 4.0]])
    # weights 1/4 and 3/4: [1/4 + 9/4, 2/4 + 12/4]
    np.testing.assert_allclose(model_level(s_sent, [1e6, 3e6]), [2.5, 3.5], atol=1e-12)
    # LLaMA-2 7B/13B/70B as in the paper: weights 7/90, 13/90, 70/90
    np.testing.assert_allclose(model_level(np.array([[9.0], [0.0], [0.9]]), [7e9, 13e9, 70e9]), [0.7 + 0.7], atol=1e-12)
    np.testing.assert_allclose(model_level(s_sent[:1], [5.0]), s_sent[0])  # one model: S_sent itself
    with pytest.raises(ValueError, match="positive"):
        model_level(s_sent, [1.0, 0.0])
    with pytest.raises(ValueError):
        model_level(s_sent, [1.0])


# ---------------------------------------------------------------------------------------------- probabilities
@pytest.mark.parametrize("which", ["tiny", "peaked"])
def test_rating_probs_match_direct_calculation(which, request):
    model, tok = request.getfixturevalue(which)
    fn = SelectIT([(model, tok)], batch_size=3)
    items = _items()
    for j in (0, 3):
        got = fn.rating_probs(items, 0, j)
        texts = [fn.render(0, j, p, r) for p, r in zip(items.prompts, items.responses, strict=True)]
        assert all(t.endswith(ANSWER_CUE) and t.startswith(fn.prompts[j]) for t in texts)
        assert got.shape == (len(items), 5)
        np.testing.assert_allclose(got, _direct_probs(model, tok, texts, 5), atol=1e-5)
        np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-9)
        np.testing.assert_allclose(fn.all_rating_probs(items, 0)[j], got, atol=1e-6)
        if which == "peaked":  # the check is meaningful: P' is far from uniform
            assert got.max() > 0.5


def test_batched_equals_one_by_one(peaked):
    items = _items(7)
    one = SelectIT([peaked], batch_size=1, num_prompts=3).levels(items)
    many_fn = SelectIT([peaked], batch_size=8, num_prompts=3)
    many = many_fn.levels(items)
    np.testing.assert_allclose(many["probs"], one["probs"], atol=1e-5)
    np.testing.assert_allclose(many["model"], one["model"], atol=1e-5)
    # an item's score does not depend on its batch neighbours or position
    perm = np.array([6, 2, 0, 5, 1, 4, 3])
    np.testing.assert_allclose(many_fn.score(items.take(perm)), many["model"][perm], atol=1e-5)


def test_chat_template_rendering_and_probs(tiny):
    model, tok = tiny
    chat_tok = type(tok).from_pretrained(tok.name_or_path)
    chat_tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    fn = SelectIT([(model, chat_tok)], num_prompts=2, batch_size=4)
    items = _items(3)
    text = fn.render(0, 1, items.prompts[0], items.responses[0])
    assert text.startswith("<user>" + fn.prompts[1] + "\nInstruction:" + items.prompts[0])
    assert text.endswith("<eos>\n<assistant>" + CHAT_ANSWER_PREFIX)
    texts = [fn.render(0, 1, p, r) for p, r in zip(items.prompts, items.responses, strict=True)]
    np.testing.assert_allclose(
        fn.rating_probs(items, 0, 1), _direct_probs(model, chat_tok, texts, 5, special=False), atol=1e-5
    )
    plain = SelectIT([(model, chat_tok)], num_prompts=1, use_chat_template=False)
    assert plain.render(0, 0, "x", "y") == plain.prompts[0] + "\nInstruction:x\nResponse:y" + ANSWER_CUE


def test_truncation(tiny):
    fn = SelectIT([tiny], max_prompt_tokens=4, max_response_tokens=3, num_prompts=1)  # byte tokenizer: chars
    text = fn.render(0, 0, "abcdefgh", "uvwxyz")
    assert "\nInstruction:abcd\nResponse:uvw\n" in text


def test_rating_tokens_single(tiny):
    from tests.conftest import _bpe_tokenizer

    bpe = _bpe_tokenizer(["score 1 2 3 4 5 12 345 is 12345", "the answer is: 4", "rate 1 to 5"] * 20)
    for tok in (tiny[1], bpe):  # byte-level; BPE with merges
        ids = rating_token_ids(tok, 5)
        assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]
    with pytest.raises(ValueError, match=r"'10' .* not a single token"):
        SelectIT([tiny], scale=10)


def test_rating_prompts_and_scale(tiny):
    fn = SelectIT([tiny], scale=3, num_prompts=len(RATING_PROMPTS))
    assert all("1 to 3" in p or "1 and 3" in p or "1-to-3" in p or "1 (poor) to 3" in p for p in fn.prompts)
    assert fn.all_rating_probs(_items(2)).shape == (len(RATING_PROMPTS), 2, 3)


# ---------------------------------------------------------------------------------------------- scores
def test_score_end_to_end(peaked):
    fn = SelectIT([peaked], batch_size=4)
    items = _items()
    s = fn.score(items)
    assert s.shape == (5,) and s.dtype == np.float32 and np.all(np.isfinite(s))
    assert np.all((s >= 0) & (s <= 5))
    lv = fn.levels(items)
    assert lv["probs"].shape == (1, 5, 5, 5) and lv["token"].shape == (1, 5, 5) and lv["sentence"].shape == (1, 5)
    np.testing.assert_allclose(lv["token"], token_level(lv["probs"]))
    np.testing.assert_allclose(lv["sentence"][0], sentence_level(lv["token"][0], 0.2))
    np.testing.assert_allclose(s, lv["sentence"][0], rtol=1e-6)  # one LM: S_model = S_sent
    assert fn.score(items.take(np.array([], dtype=np.int64))).shape == (0,)
    with pytest.raises(TypeError, match="pointwise"):
        fn.utility(items, items)


def test_model_level_two_lms(tiny, peaked):
    items = _items(4)
    both = SelectIT([tiny, peaked], num_prompts=2, alpha=0.5)
    singles = [SelectIT([lm], num_prompts=2, alpha=0.5) for lm in (tiny, peaked)]
    theta = np.array([sum(p.numel() for p in lm[0].parameters()) for lm in (tiny, peaked)], float)
    np.testing.assert_array_equal(both.params, theta)
    sent = np.stack([f.levels(items)["sentence"][0] for f in singles])
    np.testing.assert_allclose(both.score(items), model_level(sent, theta), rtol=1e-5, atol=1e-6)
    w = SelectIT([tiny, peaked], num_prompts=2, alpha=0.5, params=[1.0, 3.0])
    np.testing.assert_allclose(w.score(items), 0.25 * sent[0] + 0.75 * sent[1], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("scale", 1, "config field 'selectit.scale': must be >= 2"),
        ("num_prompts", 0, "config field 'selectit.num_prompts': must be in 1.."),
        ("num_prompts", len(RATING_PROMPTS) + 1, "config field 'selectit.num_prompts'"),
        ("alpha", -0.1, "config field 'selectit.alpha': must be >= 0"),
        ("alpha", float("nan"), "config field 'selectit.alpha'"),
        ("max_prompt_tokens", 0, "config field 'selectit.max_prompt_tokens'"),
        ("max_response_tokens", -1, "config field 'selectit.max_response_tokens'"),
        ("dtype", "float8", "config field 'selectit.dtype'"),
        ("batch_size", 0, "config field 'selectit.batch_size'"),
        ("models", "a,,b", "config field 'selectit.models': empty entry"),
    ],
)
def test_validate_errors(field, value, message):
    SelectITConfig().validate()
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        SelectITConfig(**{field: value}).validate()


def test_resolve(tiny_lm, peaked, tmp_path, monkeypatch):
    peaked_lm = str(tmp_path / "peaked")
    peaked[0].save_pretrained(peaked_lm)
    peaked[1].save_pretrained(peaked_lm)
    with pytest.raises(ConfigError, match=r"selectit\.models"):
        SelectIT.resolve(SelectITConfig(models=str(tmp_path / "missing")), "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"selectit\.models"):
        SelectIT.resolve(SelectITConfig(models=f"{tiny_lm},{tmp_path / 'empty'}"), "cpu")
    with pytest.raises(ConfigError, match=r"selectit\.scale"):
        SelectIT.resolve(SelectITConfig(models=tiny_lm, scale=1), "cpu")
    kw = SelectIT.resolve(SelectITConfig(models=f" {tiny_lm} , {peaked_lm}", num_prompts=2), "cpu")
    assert kw["models"] == [tiny_lm, peaked_lm] and kw["device"] == "cpu" and kw["num_prompts"] == 2
    assert all(isinstance(v, str | int | float | bool | list) for v in kw.values())
    monkeypatch.setattr("nncift.lm.models.embedded_lm_dir", lambda: tmp_path / "smol")
    assert SelectIT.resolve(SelectITConfig(), "cpu")["models"] == [str(tmp_path / "smol")]


def test_registered_and_built_from_resolve(tiny_lm):
    from nncift.influence import register, teachers

    register(SelectIT)  # idempotent; the module registers itself on import
    assert teachers()["selectit"] is SelectIT
    assert SelectIT.kind == "pointwise" and SelectIT.config is SelectITConfig and SelectIT.pairs_per_second > 0
    fn = SelectIT.build(**SelectIT.resolve(SelectITConfig(models=tiny_lm, num_prompts=2, batch_size=2), "cpu"))
    assert isinstance(fn, SelectIT) and len(fn.lms) == 1 and fn.num_prompts == 2
    s = fn.score(_items(3))
    assert s.shape == (3,) and s.dtype == np.float32 and np.all(np.isfinite(s))


# ---------------------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_embedded_smollm2_scores_real_items():
    from nncift.errors import MissingDependencyError
    from nncift.lm.models import embedded_lm_dir

    try:
        embedded_lm_dir()
    except MissingDependencyError as exc:
        pytest.skip(str(exc))
    fn = build_selectit(None, batch_size=8)
    assert fn.lms[0].chat  # SmolLM2-Instruct ships a chat template
    items = Items(
        [
            "What is the capital of France?",
            "Write a haiku about rain.",
            "List three prime numbers.",
            "Translate 'thank you' into Spanish.",
        ],
        [
            "The capital of France is Paris.",
            "Soft rain on the roof / whispers to the sleeping town / puddles hold the sky",
            "2, 3 and 5 are prime numbers.",
            "Bananas are yellow.",
        ],
        np.zeros((4, 4), np.float32),
    )
    lv = fn.levels(items)
    s = fn.score(items)
    assert s.shape == (4,) and s.dtype == np.float32 and np.all(np.isfinite(s))
    assert np.all((s >= 0) & (s <= 5)) and np.ptp(s) > 0
    np.testing.assert_allclose(lv["probs"].sum(-1), 1.0, atol=1e-9)
    texts = [fn.render(0, 0, p, r) for p, r in zip(items.prompts, items.responses, strict=True)]
    model, tok = fn.lms[0].model, fn.lms[0].tok
    np.testing.assert_allclose(lv["probs"][0, 0], _direct_probs(model, tok, texts, 5, special=False), atol=1e-5)
