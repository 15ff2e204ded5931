"""Convert and validate a synthetic BERT whose weights exceed 2 GB (a real run, not a lowered threshold).

The model is one encoder layer with a huge vocabulary (``--vocab`` × ``--hidden`` FP32 word
embeddings) and a huge token-type table (``--type-vocab`` rows), so the source is > 2 GB (export
goes through a temporary file with external data) and so is the output (embedding tables stay
FP32), which must be written as ``out.onnx`` + ``out.onnx.data`` and pass ``edgeq validate``.
Every single tensor stays below 2 GB: protobuf cannot copy one message above 2 GB, so a model with
a > 2 GB tensor cannot be rewritten in memory at all (a first run with one 2.3 GB table failed
with ``EncodeError: Failed to serialize proto`` in the rewrite).  Peak memory is reported.

    python tools/big_model_check.py --out results/big_model.md      # needs ~12 GB RAM, ~6 GB disk
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build(path: Path, vocab: int, hidden: int, type_vocab: int) -> int:
    import torch
    import transformers

    from tests.helpers import _tokenizer

    path.mkdir(parents=True)
    _tokenizer(path, "bert")  # the small test vocabulary; ids index the first rows of the big table
    cfg = transformers.BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=1,
                                  num_attention_heads=hidden // 64, intermediate_size=4 * hidden,
                                  max_position_embeddings=160, num_labels=2, pad_token_id=0,
                                  type_vocab_size=type_vocab)
    cfg.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(path, safe_serialization=True)
    return sum(p.numel() * 4 for p in model.parameters())


def run(cmd: list[str]) -> tuple[int, str, float]:
    def child():
        with open("/proc/self/oom_score_adj", "w") as f:  # if memory runs out, kill this, not a neighbour
            f.write("1000")

    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=child, cwd=REPO)
    return p.returncode, (p.stdout + p.stderr).strip(), time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=300_000)
    ap.add_argument("--type-vocab", type=int, default=240_000)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgeq-big-", dir=args.workdir))
    lines = [f"# A > 2 GB model: convert and validate (`python tools/big_model_check.py --vocab {args.vocab} "
             f"--type-vocab {args.type_vocab} --hidden {args.hidden}`)", ""]
    try:
        nbytes = build(work / "model", args.vocab, args.hidden, args.type_vocab)
        lines.append(f"Source: BERT, 1 layer, hidden {args.hidden}, vocabulary {args.vocab}, "
                     f"{args.type_vocab} token types: "
                     f"{nbytes / 1e9:.3f} GB of FP32 parameters (`model.safetensors` "
                     f"{(work / 'model' / 'model.safetensors').stat().st_size / 1e9:.3f} GB).")
        out = work / "out" / "big.onnx"
        out.parent.mkdir()
        edgeq = [sys.executable, "-m", "edgeq"]
        code, text, secs = run(edgeq + ["convert", str(work / "model"), str(out), "--method", "magnitude",
                                        "--k", "16", "--threads", "2"])
        lines += ["", f"`edgeq convert --method magnitude --k 16`: exit {code}, {secs:.0f} s", "",
                  "```", text.replace(str(work), "<tmp>"), "```"]
        files = sorted(out.parent.iterdir())
        lines += ["", "Output files: " + ", ".join(f"`{p.name}` {p.stat().st_size / 1e9:.3f} GB" for p in files)]
        if code == 0:
            code2, text2, secs2 = run(edgeq + ["validate", str(work / "model"), str(out), "--threads", "2"])
            lines += ["", f"`edgeq validate`: exit {code2}, {secs2:.0f} s", "", "```",
                      text2.replace(str(work), "<tmp>"), "```"]
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        lines += ["", f"Peak resident memory of the largest child process: {peak:.1f} GiB."]
    finally:
        subprocess.run(["rm", "-rf", str(work)])
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
