"""How big report.html gets for a full-size run, measured with a stand-in model (no model runs, a few seconds).

    python -m bench.report                      # DL19 top-100: 43 queries x 9 windows, 2,048 tokens of reasoning each
    python -m bench.report --method setwise     # Rank-R1's heap sort, 2,048 tokens a call

The stand-in answers every prompt with a `<think>` block of exactly --tokens tokens (SmolLM2's tokenizer) made of the
prompt's own passages, so it reads and compresses like reasoning about them, then a shuffled answer. It runs
eval.py's own pipeline (eval.main with the model loader swapped), so the folder and the report are the ones a real
run of that length would leave. Prints the sizes of traces.jsonl and report.html, raw and gzipped.
"""

from __future__ import annotations

import argparse
import gzip
import random
import re
import time
from pathlib import Path

import eval as ev


class StandIn:
    """A `Generate` that writes `tokens` tokens of reasoning and a random answer, counting like HFGenerator."""

    def __init__(self, tokenizer, tokens: int, seed: int = 0):
        self.tokenizer, self.tokens, self.rng = tokenizer, tokens, random.Random(seed)
        self.prompt_tokens = self.generated_tokens = 0
        self.seconds = 0.0

    def __call__(self, prompts: list[list[dict]]) -> list[str]:
        texts = []
        for messages in prompts:
            t = time.time()
            prompt = re.sub(r"</?(think|answer)>", "", "\n".join(m["content"] for m in messages))  # no early answer
            labels = sorted({int(x) for x in re.findall(r"^\[(\d+)\]", prompt, re.M)})  # [1].. at a line's start
            ids = self.tokenizer(prompt, add_special_tokens=False).input_ids
            self.prompt_tokens += len(ids)
            reasoning = self.tokenizer.decode((ids * (self.tokens // max(len(ids), 1) + 1))[: self.tokens])
            self.rng.shuffle(labels)
            answer = " > ".join(f"[{k}]" for k in labels) if "most relevant?" not in prompt else f"[{labels[0]}]"
            texts.append(f"<think>{reasoning}</think>\n<answer>{answer}</answer>")
            self.generated_tokens += self.tokens
            self.seconds += time.time() - t
        return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="dl19")
    p.add_argument("--method", default="listwise", choices=["listwise", "setwise"])
    p.add_argument("--top-k", type=int, default=100)
    p.add_argument("--tokens", type=int, default=2048, help="reasoning tokens per window or call (paper budget 2048)")
    p.add_argument("--out", default=None, help="run folder (default runs/bench-report-<method>)")
    args = p.parse_args()
    from transformers import AutoTokenizer

    from support.backend import smollm2_dir

    out = Path(args.out or f"runs/bench-report-{args.method}")
    for name in ("traces.jsonl", "rerank_config.json"):  # a fresh run, never a resumed one
        (out / name).unlink(missing_ok=True)
    standin = StandIn(AutoTokenizer.from_pretrained(smollm2_dir()), args.tokens)
    load_generator, ev.load_generator = ev.load_generator, lambda cfg: standin
    try:  # eval.py's own run, with the stand-in as its model
        ev.main(["--dataset", args.dataset, "--model", f"stand-in-{args.tokens}", "--method", args.method,
                 "--top-k", str(args.top_k), "--max-new-tokens", str(args.tokens), "--out", str(out)])
    finally:  # put eval.py back as it was: whoever imported it (a test) gets the real models again
        ev.load_generator = load_generator
    t = time.time()
    from support import report

    report.write_report(out)  # again, to time the drawing alone
    seconds = time.time() - t
    for name in ("traces.jsonl", "report.html"):
        data = (out / name).read_bytes()
        print(f"{name}: {len(data) / 1e6:.2f} MB, gzipped {len(gzip.compress(data)) / 1e6:.2f} MB")
    page = (out / "report.html").read_text()
    reasoning = sum(len(x.encode()) for x in re.findall(r'<pre class="think">.*?</pre>', page, re.S))
    passages = sum(len(x.encode()) for x in re.findall(r'<td class="t">.*?</td>', page, re.S))
    squares = page.count('<a class="g ')
    print(f"of which reasoning {reasoning / 1e6:.2f} MB, passage text {passages / 1e6:.2f} MB, {squares} squares")
    print(f"report drawn in {seconds:.1f}s")


if __name__ == "__main__":
    main()
