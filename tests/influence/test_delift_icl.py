import numpy as np
import pytest
import torch

from nncift.influence import Items
from nncift.influence.delift_icl import DeliftICL, build_delift_icl


def _items(n, seed=0, prefix="q"):
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "sum", "of", "two", "cats", "runs", "fast"]
    prompts = [f"{prefix}{i}: " + " ".join(rng.choice(words, size=3 + i % 4)) for i in range(n)]
    responses = [" ".join(rng.choice(words, size=2 + i % 5)) for i in range(n)]
    return Items(prompts, responses, np.zeros((n, 2), np.float32))


TOL = 1e-4


@pytest.fixture(scope="module")
def fns(peaked_lm):
    """The three modes on a trained tiny LM whose utilities are far above the tolerance."""
    return {
        m: build_delift_icl(peaked_lm, batch_size=3, mode=m, max_prompt_tokens=40, max_response_tokens=30)
        for m in ("prefix", "batched", "single")
    }


def _assert_large(u: np.ndarray) -> None:
    """A comparison at TOL only means something when utilities, and their differences, are far above it."""
    assert np.abs(u).max() > 100 * TOL and np.ptp(u) > 100 * TOL, (np.abs(u).max(), np.ptp(u))


def test_prefix_reuse_equals_full_sequences(fns):
    ex, tg = _items(3, 1, "e"), _items(7, 2, "t")
    ref = fns["single"].icl_distance(ex, tg)
    for mode in ("batched", "prefix"):
        np.testing.assert_allclose(fns[mode].icl_distance(ex, tg), ref, atol=TOL, rtol=0)
    u = fns["single"].utility(ex, tg)
    _assert_large(u)
    np.testing.assert_allclose(fns["prefix"].utility(ex, tg), u, atol=TOL)


def test_ignoring_the_prefix_is_caught(fns, monkeypatch):
    # the comparison above has teeth: suffixes that do not attend over the example's prefix give visibly
    # different values
    import contextlib

    from nncift.influence import prefix_attention as pa

    ex, tg = _items(2, 1, "e"), _items(5, 2, "t")
    ref = fns["single"].icl_distance(ex, tg)
    monkeypatch.setattr(pa, "shared_prefix", lambda layers: contextlib.nullcontext())
    wrong = fns["prefix"].icl_distance(ex, tg)
    assert np.abs(wrong - ref).max() > 100 * TOL


def test_auto_mode_settles_on_one_mode_with_the_same_values(peaked_lm, fns):
    fn = build_delift_icl(peaked_lm, batch_size=3, mode="auto", max_prompt_tokens=40, max_response_tokens=30)
    ex, tg = _items(4, 1, "e"), _items(6, 2, "t")
    got = fn.icl_distance(ex, tg)
    assert fn._auto in ("prefix", "batched")
    np.testing.assert_allclose(got, fns["single"].icl_distance(ex, tg), atol=TOL, rtol=0)
    np.testing.assert_allclose(fn.icl_distance(ex, tg), got, atol=TOL, rtol=0)  # settled: no second timing


def test_gold_logprobs_in_small_chunks_equal_one_chunk(fns, monkeypatch):
    import nncift.influence.delift_icl as mod

    ex, tg = _items(2, 1, "e"), _items(5, 2, "t")
    ref = fns["batched"].icl_distance(ex, tg)
    monkeypatch.setattr(mod, "LOGIT_BYTES", 1)  # one scored position per LM-head call
    np.testing.assert_allclose(fns["batched"].icl_distance(ex, tg), ref, atol=1e-6, rtol=0)


TRICKY = [
    "plain words here",
    " leading space",
    "  two spaces",
    "\nnewline first",
    "\n\n\nthree newlines",
    "\ttab",
    "12345 digits",
    "3.14 pi",
    "'s quote",
    "'quoted'",
    "--dashes",
    ":colon",
    "  \n mixed ws",
    "émigré café",
    "漢字テキスト",
    "😀 emoji",
    "trailing space ",
    "trailing newline\n",
    "",
    " ",
    "\n",
    "Query:\nnested",
    "a\r\nb",
    "(paren)",
    "#hash",
    "https://x.y/z?q=1",
    "I",
    "I am",
    "  ",
    "x" * 30,
]


def test_each_item_tokenised_once_equals_the_joint_tokenisation(fns):
    # ICL sequences are built from each example's prefix ids and each target's own ids where the tokenizer
    # provably gives the joint ids; on every tricky boundary the result is DELIFT's joint tokenisation
    from nncift.influence.delift_icl import HEAD_ICL, MID_ICL, SEP_ICL, TAIL

    fn = fns["prefix"]
    n = len(TRICKY)
    items = Items(TRICKY, TRICKY[::-1], np.zeros((n, 2), np.float32))
    enc = fn.encode(items)
    pieces = 0
    for e in enc:
        prefix = fn.prefix_ids(e)
        for t in enc:
            text = HEAD_ICL + e.prompt_text + SEP_ICL + e.response_text + MID_ICL + t.prompt_text + TAIL
            joint = fn.tok(text, add_special_tokens=False)["input_ids"]
            assert fn.icl_ids(e, t, prefix=prefix) == fn._with_response(list(joint), t), (e.prompt_text, t.prompt_text)
            pieces += fn.target_piece(t) is not None
    assert fn._piecewise and pieces > n * n // 2  # the fast path is taken for most targets
    assert any(fn.target_piece(t) is None for t in enc)  # and the check refuses where the boundary merges


def test_encode_in_batches_equals_one_at_a_time(fns):
    fn = fns["prefix"]
    items = _items(6, 3, "enc")
    long = Items(["word " * 100, *items.prompts], ["resp " * 100, *items.responses], np.zeros((7, 2), np.float32))
    got = fn.encode(long)
    for row, p, r in zip(got, long.prompts, long.responses, strict=True):
        ids = fn._ids(p)
        cut = p if len(ids) <= fn.max_p else fn.tok.decode(ids[: fn.max_p])
        assert row.prompt_text == cut and row.prompt == fn._ids(cut)
        assert row.response == fn._ids(r)[: fn.max_r]
    assert len(got[0].prompt) <= fn.max_p < len(fn._ids(long.prompts[0]))


def test_sequences_are_the_joint_tokenisation_of_the_delift_prompt(fns):
    # DELIFT tokenises the whole prompt text at once; piece-wise tokenisation gave "Query: " + "I" ->
    # [..., 'Ġ', 'I', ...] where the joint text gives [..., 'ĠI', ...]
    from nncift.influence.delift_icl import HEAD_ICL, HEAD_NOICL, MID_ICL, SEP_ICL, TAIL

    fn = fns["prefix"]
    items = Items(["I is two cats", "alpha runs fast"], ["beta sum", "I is"], np.zeros((2, 2), np.float32))
    e, t = fn.encode(items)
    eos = fn.tok.eos_token_id

    def joint(text):
        return fn.tok(text, add_special_tokens=False)["input_ids"]

    resp = [*joint(t.response_text), eos]
    assert fn.noicl_ids(t)[0] == [*joint(HEAD_NOICL + "alpha runs fast" + TAIL), eos, *resp]
    prompt = HEAD_ICL + "I is two cats" + SEP_ICL + "beta sum" + MID_ICL + "alpha runs fast" + TAIL
    seq, first = fn.icl_ids(e, t)
    assert seq == [*joint(prompt), eos, *resp] and first == len(joint(prompt)) + 1
    pieces = joint(HEAD_NOICL) + joint("I is two cats")  # what the piece-wise code built
    assert joint(HEAD_NOICL + "I is two cats") != pieces


def _manual_distance(model, ids, first):
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    probs = torch.softmax(logits.double(), -1)
    p = torch.stack([probs[j - 1, ids[j]] for j in range(first, len(ids))])  # token j scored by logits j-1
    return float(torch.sqrt(((1 - p) ** 2).sum()) / np.sqrt(len(p)))


def test_shift_hand_computed(fns):
    fn: DeliftICL = fns["prefix"]
    ex, tg = _items(1, 3, "e"), _items(1, 4, "t")
    e, t = fn.encode(ex)[0], fn.encode(tg)[0]
    no_icl, first_no = fn.noicl_ids(t)
    icl, first_icl = fn.icl_ids(e, t)
    n_scored = len(t.response) + 1  # response tokens and the final EOS
    assert len(no_icl) - first_no == n_scored == len(icl) - first_icl
    want = _manual_distance(fn.model, no_icl, first_no) - _manual_distance(fn.model, icl, first_icl)
    assert abs(want) > 100 * 1e-5
    assert fn.utility(ex, tg)[0, 0] == pytest.approx(want, abs=1e-5)


def test_orientation_of_kernels(fns):
    fn = fns["prefix"]
    rows, cols = _items(2, 5, "r"), _items(3, 6, "c")
    ft = fn.kernel_block("ft", rows, cols)
    ff = fn.kernel_block("ff", rows, cols)
    for i in range(2):
        for j in range(3):
            r, c = rows.take(np.array([i])), cols.take(np.array([j]))
            assert ft[i, j] == pytest.approx(fn.utility(r, c)[0, 0], abs=1e-5)  # U(row i -> col j)
            assert ff[i, j] == pytest.approx(fn.utility(c, r)[0, 0], abs=1e-5)  # U(col j -> row i)
    assert np.abs(ft - ff).max() > 100 * 1e-5  # an orientation mix-up would show


def test_no_icl_is_computed_once_per_target(fns):
    fn = fns["prefix"]
    tg = _items(4, 9, "once")
    fn.no_icl_distance(tg)
    calls = []
    orig = fn._distances
    fn._distances = lambda *a, **k: calls.append(1) or orig(*a, **k)
    try:
        fn.no_icl_distance(tg)
    finally:
        fn._distances = orig
    assert not calls


# --------------------------------------------------------------------------- real embedded model (slow)
@pytest.fixture(scope="module")
def smollm():
    return build_delift_icl(None, batch_size=8, max_prompt_tokens=64, max_response_tokens=48)


CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Egypt", "Cairo"), ("Peru", "Lima")]


def _capital_items(pairs):
    return Items(
        [f"What is the capital of {c}?" for c, _ in pairs],
        [f"The capital of {c} is {city}." for c, city in pairs],
        np.zeros((len(pairs), 2), np.float32),
    )


@pytest.mark.slow
def test_real_model_prefix_reuse_equals_full(smollm):
    ex, tg = _items(2, 11, "e"), _items(5, 12, "t")
    full = DeliftICL(
        smollm.model, smollm.tok, batch_size=8, max_prompt_tokens=64, max_response_tokens=48, mode="batched"
    )
    np.testing.assert_allclose(smollm.icl_distance(ex, tg), full.icl_distance(ex, tg), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_real_model_sign_convention(smollm):
    code = Items(
        ["Write a haiku about autumn leaves."],
        ["Red leaves drift and fall, quiet wind hums."],
        np.zeros((1, 2), np.float32),
    )
    tg = Items(["Spell the made-up word zorblax backwards."], ["xalbroz"], np.zeros((1, 2), np.float32))
    own = smollm.utility(tg, tg)[0, 0]  # the target's own pair as the in-context example
    other = smollm.utility(code, tg)[0, 0]
    assert own > 0 and own > other


@pytest.mark.slow
def test_planted_helpful_example_is_selected_first(smollm):
    from nncift.selection.greedy import lazy_greedy, minmax_scale

    words = ["apple", "river", "candle", "tiger", "piano", "cloud"]
    targets = Items(
        [f"Repeat the word {w} three times." for w in words],
        [f"{w} {w} {w}" for w in words],
        np.zeros((6, 2), np.float32),
    )
    unrelated = [
        ("Give me a bread recipe.", "Mix flour, water, yeast and salt; bake."),
        ("Sort a list in Python.", "Use sorted(xs)."),
        ("Who wrote Hamlet?", "William Shakespeare."),
        ("Name a primary color.", "Red."),
        ("What is 2+2?", "4"),
        ("Translate 'cat' to French.", "chat"),
    ]
    planted = ("Repeat the word stone three times.", "stone stone stone")  # shows the format every target needs
    cands = Items(
        [p for p, _ in [*unrelated, planted]], [r for _, r in [*unrelated, planted]], np.zeros((7, 2), np.float32)
    )
    k = smollm.kernel_block("ff", targets, cands)  # k[i, j] = U(candidate j -> target i), the FL orientation
    first = lazy_greedy(minmax_scale(k), 1)[0][0]
    assert first == 6


@pytest.mark.parametrize("mode", ["prefix", "single"])
def test_aligned_pairs_equal_the_full_kernel_entries(fns, mode):
    # utility_pairs (the self-utilities of label.diagonal and any paired set) batches full sequences of
    # different examples; each entry must equal the same pair in the cross-product kernel. A trained tiny LM
    # gives utilities far above the tolerance, so a mis-paired entry cannot pass.
    fn = fns[mode]
    items = _items(5, 8, "d")
    full = fn.utility(items, items)
    assert np.ptp(full) > 100 * 1e-4 and np.abs(full - np.diag(full)[None, :]).max() > 100 * 1e-4
    idx_e, idx_t = np.array([0, 1, 2, 3, 4, 2]), np.array([0, 1, 2, 3, 4, 0])
    got = fn.utility_pairs(items.take(idx_e), items.take(idx_t))
    np.testing.assert_allclose(got, full[idx_e, idx_t], atol=1e-4, rtol=0)
    diag = fn.kernel_pairs("ff", items, items)
    np.testing.assert_allclose(diag, np.diag(full), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_real_model_equals_a_joint_tokenisation_reference(smollm):
    # 16 ShareGPT pairs: every mode against DELIFT's construction computed independently (whole prompt text
    # tokenised at once, plain full forward); measured max |diff| 2.5e-7 on a spread of 1.5e-2
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from _common import items, sharegpt_rows

    from nncift.influence.delift_icl import HEAD_ICL, HEAD_NOICL, MID_ICL, SEP_ICL, TAIL

    rows = sharegpt_rows(8)
    ex_items, tg_items = items(rows[:4]), items(rows[4:])
    fn = smollm
    eos = fn.tok.eos_token_id

    def ids(text):
        return fn.tok(text, add_special_tokens=False)["input_ids"]

    def dist(prompt_ids, resp):
        seq = [*prompt_ids, eos, *resp, eos]
        with torch.no_grad():
            logits = fn.model(torch.tensor([seq])).logits[0].double()
        first = len(prompt_ids) + 1
        p = torch.softmax(logits[first - 1 : len(seq) - 1], -1).gather(1, torch.tensor(seq[first:])[:, None])
        return float(torch.sqrt(((1 - p) ** 2).sum()) / np.sqrt(len(seq) - first))

    ref = np.empty((4, 4))
    for j, t in enumerate(fn.encode(tg_items)):
        d0 = dist(ids(HEAD_NOICL + t.prompt_text + TAIL), t.response)
        for i, e in enumerate(fn.encode(ex_items)):
            text = HEAD_ICL + e.prompt_text + SEP_ICL + e.response_text + MID_ICL + t.prompt_text + TAIL
            ref[i, j] = d0 - dist(ids(text), t.response)
    assert np.ptp(ref) > 1e-3
    for mode in ("prefix", "batched"):
        f = DeliftICL(fn.model, fn.tok, batch_size=8, max_prompt_tokens=64, max_response_tokens=48, mode=mode)
        np.testing.assert_allclose(f.utility(ex_items, tg_items), ref, atol=2e-5, rtol=0)


def test_length_batches_bound_padding_and_cover_every_sequence():
    from nncift.influence import delift_icl as mod

    rng = np.random.default_rng(0)
    lengths = sorted(rng.integers(50, 600, 64).tolist())
    for bs in (1, 8, 64):
        batches = mod.length_batches(lengths, bs)
        assert [i for sl in batches for i in range(len(lengths))[sl]] == list(range(len(lengths)))
        assert all(0 < sl.stop - sl.start <= bs for sl in batches)
    real = sum(lengths)
    fixed = sum(len(lengths[s : s + 64]) * max(lengths[s : s + 64]) for s in range(0, 64, 64))
    split = sum((sl.stop - sl.start) * lengths[sl.stop - 1] for sl in mod.length_batches(lengths, 64))
    assert split < 0.8 * fixed and split > real  # measured: 1.29x the real tokens against 1.8x
    # every batch closed early holds at least MIN_BATCH_TOKENS padded tokens
    for sl in mod.length_batches(lengths, 64)[:-1]:
        assert (sl.stop - sl.start) * lengths[sl.stop - 1] >= mod.MIN_BATCH_TOKENS or sl.stop - sl.start == 64
