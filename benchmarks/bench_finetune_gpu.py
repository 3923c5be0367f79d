"""Check: DeepSpeed fine-tuning steps out of the box (the default optimizer builds no op), one config per process.

Saves a random-weight Llama of a real shape (``--shape``, SmolLM2's tokenizer) to a temporary folder, then runs
:func:`nncift.lm.trainer.finetune_local` (the local executor's fine-tune) for ``--steps`` optimizer steps on
ShareGPT rows and prints steps, seconds, first and last loss and the parameter dtype. ``TORCH_CUDA_ARCH_LIST``
is set to a Hopper list containing ``9.0a`` first, the one that breaks DeepSpeed's FusedAdam JIT build.

    python3 benchmarks/bench_finetune_gpu.py --method lora --deepspeed zero2 --json lora.json
    python3 benchmarks/bench_finetune_gpu.py --method full --deepspeed zero3 --json full.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from _common import random_lm, sharegpt_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="135m")
    ap.add_argument("--method", default="lora", help="lora | full")
    ap.add_argument("--deepspeed", default="zero2")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--optimizer", default="torch_adamw")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0a")
    use_gpu = torch.cuda.is_available()

    from nncift.config import FinetuneConfig
    from nncift.lm.trainer import finetune_local

    tmp = tempfile.mkdtemp(prefix="nncift_ft_")
    model, tok = random_lm(args.shape, "cpu", "float32")
    model.save_pretrained(f"{tmp}/model")
    tok.save_pretrained(f"{tmp}/model")
    del model
    ft = dataclasses.asdict(FinetuneConfig())
    batch = 2 * args.micro_batch_size
    ft.update({"model": f"{tmp}/model", "method": args.method, "deepspeed": args.deepspeed, "epochs": 1,
               "batch_size": batch, "micro_batch_size": args.micro_batch_size, "save_every": 10**6,
               "optimizer": args.optimizer, "lr": 2e-4 if args.method == "lora" else 2e-5})  # fmt: skip
    rows = sharegpt_rows(batch * args.steps)
    data = {"prompt": [r["prompt"] for r in rows], "response": [r["response"] for r in rows]}
    t0 = time.perf_counter()
    summary = finetune_local(ft, data, f"{tmp}/run", use_gpu=use_gpu)
    total = time.perf_counter() - t0
    recs = [json.loads(x) for x in Path(f"{tmp}/run/progress.jsonl").read_text().splitlines()]
    res = {"method": args.method, "deepspeed": args.deepspeed, "optimizer": args.optimizer, "use_gpu": use_gpu,
           "steps": len(recs), "seconds_total": total, "seconds_train": summary.get("seconds"),
           "first_loss": recs[0]["loss"], "last_loss": recs[-1]["loss"], "param_dtype": summary.get("param_dtype"),
           "TORCH_CUDA_ARCH_LIST": os.environ["TORCH_CUDA_ARCH_LIST"]}  # fmt: skip
    print(json.dumps(res))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
