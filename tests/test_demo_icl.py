"""`make demo`'s ground truth is the shipped full-DELIFT table: the live DELIFT ICL teacher must reproduce it.

`jobs/configs/demo.yaml` runs the DELIFT ICL teacher (embedded SmolLM2-135M-Instruct) live on the items
of `benchmarks/data/delift_icl_smollm2.parquet` and scores its selection against that table
(`fidelity.truth_table`). That comparison is only meaningful when the live labels are the table's values: same
model, same token caps, same dtype, same joint tokenisation, same items. This test builds the items with the
pipeline's own data stage (the table's recorded data settings) and the teacher as the label stage does
(`teacher_class(...).resolve(section, device)` then `build_influence_function`), labels a deterministic sample
of pairs (off-diagonal K_FF and K_FT pairs through the shared-prefix path, self-utilities U(i -> i) through the
aligned-pairs path the label stage uses for the exact diagonal) and compares them with the table.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "data" / "delift_icl_smollm2.parquet"
CONFIG = ROOT / "jobs" / "configs" / "demo.yaml"
REL_TOL = 1e-4  # of the table's value spread (max - min); the table was written in float32


def table_settings() -> tuple[list[str], list[str]]:
    """``--set`` overrides of the table's data settings and of its teacher settings (from its provenance)."""
    prov = json.loads(TABLE.with_suffix(".json").read_text())
    lab = prov.get("teacher_config") or prov["label_config"]
    data = [f"{k}={v}" for k, v in prov["data_overrides"].items()]
    teacher = [f"delift_icl.{k}={lab[k]}" for k in ("max_prompt_tokens", "max_response_tokens", "dtype")]
    return data, teacher


def test_demo_config_labels_the_table_items_with_the_table_teacher():
    """The demo config asks for the table's items and teacher settings (so the test below covers it)."""
    from nncift.config import load_config

    data, teacher = table_settings()
    demo = load_config(str(CONFIG))
    want = load_config(None, [*data, *teacher])
    assert demo.label.function == "delift_icl"
    assert Path(demo.fidelity.truth_table) == TABLE.relative_to(ROOT)
    assert demo.seed == want.seed and demo.data == want.data
    for k in ("model", "backend", "dtype", "max_prompt_tokens", "max_response_tokens", "trust_remote_code"):
        assert getattr(demo.delift_icl, k) == getattr(want.delift_icl, k), k


def test_live_delift_icl_labels_equal_the_shipped_table(tmp_path):
    import torch

    from nncift.config import load_config
    from nncift.influence import Items, build_influence_function, teacher_class
    from nncift.runner import Runner

    t0 = time.perf_counter()
    data, teacher = table_settings()
    # mode=prefix: the path `auto` settles on for these rectangles on a CPU (auto would first time both on them)
    sets = [*data, *teacher, "label.function=delift_icl", "delift_icl.mode=prefix", "ray.executor=local"]
    cfg = load_config(None, sets)
    Runner(cfg, tmp_path / "run").run("data")  # the items exactly as a run on these settings sees them

    def items(side: str) -> Items:
        t = pq.read_table(tmp_path / "run" / "data" / f"{side}.parquet")
        ids = t.column("id").to_pylist()
        return Items(t.column("prompt").to_pylist(), t.column("response").to_pylist(), np.zeros((len(ids), 1)), ids)

    pool, target = items("pool"), items("target")
    tab = pq.read_table(TABLE).to_pydict()
    truth = dict(zip(zip(tab["example_id"], tab["target_id"], strict=True), tab["value"], strict=True))
    assert set(pool.ids) | set(target.ids) == set(tab["target_id"]), "the data stage no longer gives the table's items"
    spread = float(np.ptp(tab["value"]))

    cls = teacher_class("delift_icl")  # the label stage's way: resolve the section in the driver, build in a worker
    fn = build_influence_function("delift_icl", **cls.resolve(cfg.delift_icl, "cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a label actor with num_cpus=1; two threads on a busy 2-core machine are 10x slower
    try:
        live = label_sample(fn, pool, target)
    finally:
        torch.set_num_threads(threads)

    diffs = np.array([abs(v - truth[(x, y)]) for x, y, v in live])
    w, off = int(diffs.argmax()), np.array([x != y for x, y, _ in live])
    print(
        f"\n{len(live)} pairs ({(~off).sum()} self-utilities), table spread {spread:.4f}: max |live - table| "
        f"{diffs[w]:.2e} at {live[w][:2]} ({diffs[w] / spread:.2e} of the spread; off-diagonal pairs "
        f"{diffs[off].max():.2e}), {time.perf_counter() - t0:.1f} s"
    )
    assert len(live) == 9 and (~off).sum() == 4
    assert diffs[w] <= REL_TOL * spread, (live[w], truth[live[w][:2]])


def label_sample(fn, pool, target) -> list[tuple[str, str, float]]:
    """(example id, target id, U(example -> target)) of a fixed sample: a rectangle of 2 pool examples x (2 pool +
    1 target) targets (shared-prefix path, one self-utility in it) and 3 self-utilities as aligned pairs (batched
    full sequences, the label stage's exact diagonal)."""
    from nncift.influence import Items

    rng = np.random.default_rng(0)
    e, p, d = (int(i) for i in rng.choice(len(pool), 3, replace=False))
    t = int(rng.integers(len(target)))
    examples = pool.take([e, p])  # rectangle (prefix reuse): 2 examples x (2 pool + 1 target) targets
    targets = Items(
        [pool.prompts[e], pool.prompts[d], target.prompts[t]],
        [pool.responses[e], pool.responses[d], target.responses[t]],
        np.zeros((3, 1)),
        [pool.ids[e], pool.ids[d], target.ids[t]],
    )
    live = [  # (example id, target id, value)
        (x, y, float(v))
        for x, row in zip(examples.ids, fn.utility(examples, targets), strict=True)
        for y, v in zip(targets.ids, row, strict=True)
    ]
    diag = pool.take([p, d, e])  # the exact diagonal as the label stage labels it: aligned pairs, full sequences
    live += [(i, i, float(v)) for i, v in zip(diag.ids, fn.utility_pairs(diag, diag), strict=True)]
    return live
