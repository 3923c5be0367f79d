"""Check: DELIFT ICL utilities against an independent joint-tokenisation reference, on the embedded SmolLM2.

The reference builds DELIFT's prompt strings, tokenises each whole string once with the HF tokenizer, runs a
plain full forward (``model(input_ids).logits``) and computes d = ||1 - p|| / sqrt(T) over the response tokens
and the final EOS with the shifted logits. It is compared with nncift's prefix-reuse, batched and single modes,
and with the piece-wise tokenisation nncift used before (template pieces tokenised separately).

    .venv/bin/python benchmarks/check_delift_tokenisation.py [--examples 4 --targets 4 --tokens 48]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--targets", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48, help="max prompt and response tokens")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from _common import items, sharegpt_rows

    from nncift.influence.delift_icl import HEAD_ICL, HEAD_NOICL, MID_ICL, SEP_ICL, TAIL, DeliftICL, build_delift_icl

    rows = sharegpt_rows(args.examples + args.targets)
    ex_items, tg_items = items(rows[: args.examples]), items(rows[args.examples :])
    fn = build_delift_icl(None, batch_size=8, max_prompt_tokens=args.tokens, max_response_tokens=args.tokens)
    model, tok, eos = fn.model, fn.tok, fn.tok.eos_token_id
    ex_enc, tg_enc = fn.encode(ex_items), fn.encode(tg_items)

    def ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def dist(prompt_ids: list[int], resp: list[int]) -> float:
        seq = [*prompt_ids, eos, *resp, eos]
        logits = model(torch.tensor([seq])).logits[0].double()
        first = len(prompt_ids) + 1
        p = torch.softmax(logits[first - 1 : len(seq) - 1], -1).gather(1, torch.tensor(seq[first:])[:, None])
        return float(torch.sqrt(((1 - p) ** 2).sum()) / np.sqrt(len(seq) - first))

    def reference(joint: bool) -> np.ndarray:
        out = np.empty((len(ex_enc), len(tg_enc)))
        for j, t in enumerate(tg_enc):
            noicl = ids(HEAD_NOICL + t.prompt_text + TAIL) if joint else ids(HEAD_NOICL) + t.prompt + ids(TAIL)
            d0 = dist(noicl, t.response)
            for i, e in enumerate(ex_enc):
                text = HEAD_ICL + e.prompt_text + SEP_ICL + e.response_text + MID_ICL + t.prompt_text + TAIL
                pieces = (ids(HEAD_ICL) + e.prompt + ids(SEP_ICL) + ids(e.response_text) + ids(MID_ICL) + t.prompt
                          + ids(TAIL))  # fmt: skip
                out[i, j] = d0 - dist(ids(text) if joint else pieces, t.response)
        return out

    ref = reference(joint=True)
    old = reference(joint=False)
    print(f"{len(ex_enc)} x {len(tg_enc)} = {ref.size} ShareGPT pairs, {args.tokens}/{args.tokens} tokens, "
          f"utility spread {np.ptp(ref):.3e}")  # fmt: skip
    for mode in ("prefix", "batched", "single"):
        f = DeliftICL(model, tok, batch_size=8, max_prompt_tokens=args.tokens, max_response_tokens=args.tokens,
                      mode=mode)  # fmt: skip
        print(
            f"nncift {mode:8s} vs joint reference: max |diff| {np.abs(f.utility(ex_items, tg_items) - ref).max():.2e}"
        )
    print(f"piece-wise tokenisation (before) vs joint reference: max |diff| {np.abs(old - ref).max():.2e}")


if __name__ == "__main__":
    main()
