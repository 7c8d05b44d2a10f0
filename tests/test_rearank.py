"""rearank.py: byte-exact prompts, the parser on bad output, window edges, the sliding-window loop with a fake model
(write-back between overlapping windows, batching, resume), and token-level generation on a tiny random model."""

import json
import random

import pytest

import eval as ev
from support import backend
import rearank as rr
from data import Candidate, Query, Ranking

# ----------------------------------------------------------------------------------------------------------------------
# prompts: literal strings transcribed from the papers (docs/method.md §2) (not built from rearank's own constants)

METHOD_REARANK_SYSTEM = "You are DeepRerank, an intelligent assistant that can rank passages based on their relevancy to the search query. You first thinks about the reasoning process in the mind and then provides the user with the answer."  # noqa: E501
METHOD_REARANK_USER = "I will provide you with passages, each indicated by number identifier []. Rank the passages based on their relevance to the search query.Search Query: {query}. \nRank the {num} passages above based on their relevance to the search query.The passages should be listed in descending order using identifiers. The most relevant passages should be listed first. The output format should be <answer> [] > [] </answer>, e.g., <answer> [1] > [2] </answer>."  # noqa: E501
METHOD_REARANK_LAST = """Please rank these passages according to their relevance to the search query: "{query}"
            Follow these steps exactly:
            1. First, within <think> tags, analyze EACH passage individually:
            - Evaluate how well it addresses the query
            - Note specific relevant information or keywords

            2. Then, within <answer> tags, provide ONLY the final ranking in descending order of relevance using the format: [X] > [Y] > [Z]"""  # noqa: E501
METHOD_RANKGPT_SYSTEM = "You are RankGPT, an intelligent assistant that can rank passages based on their relevancy to the query."  # noqa: E501
METHOD_RANKGPT_USER = "I will provide you with {num} passages, each indicated by number identifier []. \nRank the passages based on their relevance to query: {query}."  # noqa: E501
METHOD_RANKGPT_LAST = "Search Query: {query}. \nRank the {num} passages above based on their relevance to the search query. The passages should be listed in descending order using identifiers. The most relevant passages should be listed first. The output format should be [] > [], e.g., [1] > [2]. Only response the ranking results, do not say any word or explain."  # noqa: E501


def test_rearank_prompt_is_byte_exact():
    q = "how long is life cycle of flea"
    got = rr.build_prompt(q, ["Title: Content: Fleas live\n\n a  year.", "Cats  sleep."])
    assert got == [
        {"role": "system", "content": METHOD_REARANK_SYSTEM},
        {"role": "user", "content": METHOD_REARANK_USER.replace("{query}", q).replace("{num}", "2")},
        {"role": "assistant", "content": "Okay, please provide the passages."},
        {"role": "user", "content": "[1] Fleas live a year."},
        {"role": "assistant", "content": "Received passage [1]."},
        {"role": "user", "content": "[2] Cats sleep."},
        {"role": "assistant", "content": "Received passage [2]."},
        {"role": "user", "content": METHOD_REARANK_LAST.replace("{query}", q)},
    ]
    # the released oddities survive: no space after "query.", a newline after "{query}. ", 12-space indents
    assert "search query.Search Query: " in got[1]["content"] and f"{q}. \nRank the 2" in got[1]["content"]
    assert got[-1]["content"].count("\n            ") == 5 and "keywords\n\n            2." in got[-1]["content"]


def test_rankgpt_prompt_is_byte_exact():
    q = "flea"
    got = rr.build_prompt(q, ["a", "b", "c"], style="rankgpt")
    assert got == [
        {"role": "system", "content": METHOD_RANKGPT_SYSTEM},
        {"role": "user", "content": METHOD_RANKGPT_USER.replace("{query}", q).replace("{num}", "3")},
        {"role": "assistant", "content": "Okay, please provide the passages."},
        {"role": "user", "content": "[1] a"},
        {"role": "user", "content": "[2] b"},
        {"role": "user", "content": "[3] c"},
        {"role": "user", "content": METHOD_RANKGPT_LAST.replace("{query}", q).replace("{num}", "3")},
    ]


def test_passages_are_cut_to_characters_after_labels_and_whitespace():
    long = "Title: Flea facts  Content:  " + "word  " * 50_000  # far longer than any model's context
    rearank_text = rr.build_prompt("q", [long])[3]["content"]
    rankgpt_text = rr.build_prompt("q", [long], style="rankgpt")[3]["content"]
    assert rearank_text == "[1] " + ("Flea facts " + "word " * 100)[:400]
    assert rankgpt_text == "[1] " + ("Flea facts " + "word " * 100)[:300]
    mentions = "A passage about Title: and Content: labels"
    assert rr.clean_passage(mentions, 400) == mentions  # labels only count at the start
    with pytest.raises(ValueError, match="prompt style"):
        rr.build_prompt("q", ["a"], style="listwise")


# ----------------------------------------------------------------------------------------------------------------------
# parsing: a valid permutation, whatever the model says


def is_permutation(order, n):
    return sorted(order) == list(range(n))


@pytest.mark.parametrize(
    "text, n, expected",
    [
        ("<think>x</think><answer>[2] > [3] > [1]</answer>", 3, [1, 2, 0]),
        ("[2] > [3] > [1]", 3, [1, 2, 0]),  # no tags at all: the whole text
        ("<think>[1] is best</think> [3] > [2]", 3, [2, 1, 0]),  # no answer block: what follows </think>
        ("<think>[1] is best</think><answer>[3] > [2]", 3, [2, 1, 0]),  # unclosed <answer>
        ("<answer>[2] > [2] > [9] > [1] > [2]</answer>", 3, [1, 0, 2]),  # repeats and out-of-range ids
        ("<answer>[0] > [3]</answer>", 3, [2, 0, 1]),  # [0] is not an id (they start at 1)
        ("", 4, [0, 1, 2, 3]),  # empty: the input order
        ("Received passage [21].", 20, list(range(20))),  # what SmolLM2 often says
        ("In 2019, 3 of the 5 passages mention fleas; I rank 2 first.", 5, [2, 4, 1, 0, 3]),  # prose: integers in order
        ("<answer>[" + "9" * 5000 + "] > [2]</answer>", 3, [1, 0, 2]),  # a digit run int() would refuse
        ("<answer>first</answer> <answer>[2] > [1]</answer>", 2, [1, 0]),  # the last answer block counts
    ],
)
def test_parse_ranking_bad_output(text, n, expected):
    assert rr.parse_ranking(text, n) == expected


def test_parse_ranking_is_always_a_permutation():
    rng = random.Random(0)
    alphabet = list("[]<>/ answerthink0123456789\n")
    for _ in range(2000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        n = rng.randint(0, 25)
        assert is_permutation(rr.parse_ranking(text, n), n), text


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>a</think>\n<answer>[3] > [1] > [2]</answer>", (True, True)),
        ("<think>a</think><answer> [3]>[1] </answer>", (True, True)),
        ("<think>a</think><answer>[1]</answer>", (True, True)),
        ("<think>a</think><answer>[3] > [1] and [2]</answer>", (True, False)),
        ("<think>a</think><answer>3 > 1 > 2</answer>", (True, False)),
        ("<think>a</think><answer></answer>", (True, False)),
        ("<answer>[3] > [1]</answer>", (False, True)),
        ("<answer>[3] > [1]</answer><think>late</think>", (False, True)),  # think must come first
        ("<think>a</think><answer>[3] > [1]", (False, False)),  # unclosed answer
        ("<think>a<answer>[3] > [1]</answer>", (False, True)),  # unclosed think
        ("", (False, False)),
    ],
)
def test_answer_format(text, expected):
    assert rr.answer_format(text) == expected


# ----------------------------------------------------------------------------------------------------------------------
# windows


@pytest.mark.parametrize("n", [0, 1, 7, 10, 19, 20, 21, 25, 30, 99, 100, 101, 137])
@pytest.mark.parametrize("window, step", [(20, 10), (20, 20), (4, 1), (5, 3)])
def test_window_spans_cover_bottom_to_top(n, window, step):
    spans = rr.window_spans(n, window, step)
    covered = {i for s, e in spans for i in range(s, e)}
    assert covered == set(range(n))
    if n:
        assert spans[0][1] == n and spans[-1][0] == 0  # bottom first, the top always last
        assert all(e - s == min(window, n) for s, e in spans[:-1]) and 0 < spans[-1][1] - spans[-1][0] <= window
        assert all(a[1] - b[1] == step for a, b in zip(spans, spans[1:]))  # each window moves up by `step`
    else:
        assert spans == []


def test_window_spans_published_and_bad_arguments():
    assert rr.window_spans(100, 20, 10) == [(s, s + 20) for s in range(80, -1, -10)]
    assert rr.window_spans(5) == [(0, 5)]  # a candidate list shorter than the window: one window
    for window, step in [(0, 1), (20, 0), (10, 20)]:
        with pytest.raises(ValueError):
            rr.window_spans(100, window, step)


# ----------------------------------------------------------------------------------------------------------------------
# the reranking loop with a fake model


def ranking(qid, n, rel=None):
    """Candidates d0..d{n-1} in that order; passage text carries a hidden relevance the fake model reads."""
    rel = rel or list(range(n))
    candidates = [Candidate(f"{qid}-d{i}", f"doc rel={rel[i]}", float(n - i)) for i in range(n)]
    return Ranking(Query(qid, f"query {qid}"), candidates)


class PerfectModel:
    """Ranks each window by the hidden relevance in the passage text, records every prompt and batch size."""

    def __init__(self, fail_after: int | None = None):
        self.prompts, self.batches, self.fail_after = [], [], fail_after

    def __call__(self, prompts):
        if self.fail_after is not None and len(self.prompts) + len(prompts) > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.batches.append(len(prompts))
        self.prompts += prompts
        out = []
        for messages in prompts:
            passages = [m["content"] for m in messages if m["role"] == "user" and m["content"].startswith("[")]
            rel = [int(p.split("rel=")[1]) if "rel=" in p else len(p) for p in passages]  # real data: longest first
            best = sorted(range(len(rel)), key=lambda i: -rel[i])
            out.append("<think>by rel</think><answer>" + " > ".join(f"[{i + 1}]" for i in best) + "</answer>")
        return out


def test_rerank_writes_each_window_back_before_the_next():
    # relevance rises towards the bottom: only write-back between overlapping windows can lift it to the top
    r = ranking("q", 100, rel=list(range(100)))
    model = PerfectModel()
    (out,), traces = rr.rerank([r], model, window=20, step=10)
    assert [(t.start, t.end) for t in traces] == rr.window_spans(100)
    top = [c.docid for c in out.candidates[:10]]
    assert top == [f"q-d{i}" for i in range(99, 89, -1)]  # the global top-10, in order, after one pass
    # the second window (70, 90) shows the best 10 of the first window in its bottom half, best first
    second = [m["content"] for m in model.prompts[1] if m["role"] == "user" and m["content"][:1] == "["]
    assert [p.split("rel=")[1] for p in second[10:]] == [str(i) for i in range(99, 89, -1)]
    assert traces[0].docids == [f"q-d{i}" for i in range(80, 100)] and traces[0].order == list(range(19, -1, -1))
    assert sorted(c.docid for c in out.candidates) == sorted(c.docid for c in r.candidates)


def test_rerank_batches_the_same_window_position_across_queries():
    rankings = [ranking("a", 100), ranking("b", 20), ranking("c", 5), ranking("d", 30)]
    model = PerfectModel()
    out, traces = rr.rerank(rankings, model, window=20, step=10, batch_size=3)
    # window position 0 of all four queries (batches of 3 + 1), then position 1 of a and d, then a alone
    assert model.batches == [3, 1, 2] + [1] * 7
    assert len(traces) == 9 + 1 + 1 + 2
    assert [len(r.candidates) for r in out] == [100, 20, 5, 30]  # a list shorter than the window: one short window
    assert [c.docid for c in out[2].candidates] == [f"c-d{i}" for i in range(4, -1, -1)]


def test_rerank_rejects_a_generate_that_drops_prompts():
    with pytest.raises(ValueError, match="completions"):
        rr.rerank([ranking("q", 20)], lambda prompts: [])


def test_rerank_resumes_from_traces_without_regenerating():
    rankings = [ranking("a", 50), ranking("b", 40), ranking("c", 15)]
    full, full_traces = rr.rerank(rankings, PerfectModel(), batch_size=2)
    saved = []
    with pytest.raises(KeyboardInterrupt):
        rr.rerank(rankings, PerfectModel(fail_after=5), batch_size=2, on_window=saved.extend)
    assert len(saved) == 5  # batches [a b] [c] [a b] were reported; the 4th, [a b], was interrupted
    again = PerfectModel()
    resumed, traces = rr.rerank(rankings, again, batch_size=2, traces=saved, on_window=lambda new: None)
    assert len(again.prompts) == len(full_traces) - len(saved)  # finished windows were replayed, not generated
    assert [r.docids() for r in resumed] == [r.docids() for r in full]
    assert sorted((t.qid, t.start) for t in traces) == sorted((t.qid, t.start) for t in full_traces)
    # traces from another candidate list must not be replayed silently
    other = [ranking("a", 50, rel=list(range(50))[::-1])]
    stale = rr.WindowTrace("a", 30, 50, "", list(range(20)), [f"x{i}" for i in range(20)])
    with pytest.raises(ValueError, match="other candidates"):
        rr.rerank(other, PerfectModel(), traces=[stale])
    damaged = rr.WindowTrace("a", 30, 50, "", [0, 0, 1], [])  # not a permutation of the window
    with pytest.raises(ValueError, match="damaged"):
        rr.rerank(other, PerfectModel(), traces=[damaged])


# ----------------------------------------------------------------------------------------------------------------------
# eval.py with a model: traces.jsonl, resume after an interruption, settings checks (fake model, real DL19 data)


class FakeGenerator(PerfectModel):
    """Stands in for backend.HFGenerator: same constructor, counts tokens like it."""

    instances: list = []
    fail_after = None

    def __init__(self, model, tokenizer, max_new_tokens=2048, batch_size=8):
        super().__init__(FakeGenerator.fail_after)
        self.prompt_tokens = self.generated_tokens = 0
        self.seconds = 0.0
        FakeGenerator.instances.append(self)


@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(backend, "load_model", lambda name: (type("M", (), {"device": "cpu"})(), None))
    monkeypatch.setattr(backend, "HFGenerator", FakeGenerator)
    FakeGenerator.instances = []
    yield FakeGenerator
    FakeGenerator.fail_after = None


def test_eval_with_model_writes_traces_and_resumes(data_root, tmp_path, capsys, fake_model):
    args = ["--dataset", "dl19", "--data-dir", str(data_root), "--model", "fake", "--top-k", "30", "--limit", "4",
            "--batch-size", "2", "--out", str(tmp_path)]  # fmt: skip
    fake_model.fail_after = 5  # 4 queries x 2 windows; killed in the third batch
    with pytest.raises(KeyboardInterrupt):
        ev.main(args)
    lines = (tmp_path / "traces.jsonl").read_text().splitlines()
    assert len(lines) == 4
    (tmp_path / "traces.jsonl").write_text("\n".join(lines) + '\n{"qid": "half a li')  # killed mid-write too
    fake_model.fail_after = None
    ev.main(args)
    assert len(fake_model.instances[-1].prompts) == 4  # only the 4 unfinished windows were generated
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("first stage nDCG@10 0.") for line in out)
    assert any(line.startswith("reranked nDCG@10 0.") for line in out)
    traces = [json.loads(line) for line in (tmp_path / "traces.jsonl").read_text().splitlines()]
    assert len(traces) == 8 and set(traces[0]) == {"qid", "start", "end", "completion", "order", "docids"}
    run = (tmp_path / "run.trec").read_text().splitlines()
    assert len(run) == 4 * 30
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["resumed_windows"] == 4 and metrics["answer_is_ranking_list"] == 1.0
    # a rerun with settings that change the prompts refuses to mix old windows in
    with pytest.raises(SystemExit, match="other settings"):
        ev.main(args[:-2] + ["--prompt", "rankgpt", "--out", str(tmp_path)])


def test_eval_unreachable_model_is_a_clear_error(data_root, tmp_path):
    with pytest.raises(SystemExit, match="--model smollm2"):
        ev.main(["--dataset", "dl19", "--data-dir", str(data_root), "--model", "no-such-org/no-such-model-xyz",
                 "--limit", "1", "--top-k", "5", "--out", str(tmp_path)])  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# token-level generation on a tiny random Llama with the SmolLM2 tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    try:
        path = backend.smollm2_dir()  # converts the embedded model once (~30 s), then cached
    except backend.ModelError as e:
        pytest.skip(f"needs the embedded model's tokenizer: {e}")
    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return tok


def tiny_llama(tokenizer, cls=None, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape = dict(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    config = LlamaConfig(**{**shape, **overrides})
    return (cls or LlamaForCausalLM)(config).eval()


def scripted_llama(tokenizer, scripts: dict[str, list[int]]):
    """A tiny Llama that emits a fixed token script; the script is picked per row from its attention mask ("short"
    for a left-padded row, else "long"), so the tests also check which row answers which prompt."""
    import torch
    from transformers import LlamaForCausalLM

    class Scripted(LlamaForCausalLM):
        def forward(self, input_ids=None, attention_mask=None, **kwargs):
            out = super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            if input_ids.shape[1] > 1:  # a prompt pass: prompt_once.prompt_forward's, or plain generate's padded prefill
                self.step = 0
            if kwargs.get("use_cache") is False:
                return out  # prompt_once.prompt_forward: its logits are not used
            # generate drops an all-ones mask: no mask means no padding
            mask = attention_mask if attention_mask is not None else torch.ones(len(out.logits), 1)
            padded = [m[0] == 0 for m in mask.tolist()]
            rows = [scripts["short" if pad else "long"] for pad in padded]
            for b, script in enumerate(rows):
                out.logits[b, -1, :] = -1e9
                out.logits[b, -1, script[min(self.step, len(script) - 1)]] = 0.0
            self.step += 1
            return out

    return tiny_llama(tokenizer, cls=Scripted)


@pytest.mark.parametrize("repeat_prompt", [False, True])
def test_generate_tokens_stops_at_answer_or_eos_and_masks_the_rest(tokenizer, repeat_prompt):
    import torch

    answer = "<think>x</think><answer>[2] > [1]</answer>"
    stop_at = len(tokenizer(answer, add_special_tokens=False).input_ids)
    scripts = {
        "long": tokenizer(answer + " and more after it", add_special_tokens=False).input_ids,
        "short": tokenizer("no tags", add_special_tokens=False).input_ids + [tokenizer.eos_token_id] + [42] * 30,
    }
    model = scripted_llama(tokenizer, scripts)
    prompts = [rr.build_prompt("q", ["a"]), rr.build_prompt("a longer query", ["passage one", "passage two"])]
    g = backend.generate_tokens(model, tokenizer, prompts, max_new_tokens=40, do_sample=True, num_return_sequences=2,
                           repeat_prompt=repeat_prompt)
    B, P = g.prompt_ids.shape
    assert B == 2 and g.prompt_mask[0, 0] == 0 and g.prompt_mask[:, -1].all()  # left padding
    assert g.completion_ids.shape[0] == 4 and g.completion_ids.shape == g.completion_mask.shape
    assert g.texts == ["no tags", "no tags", answer, answer]  # rows b*G .. b*G+G-1 answer prompt b
    # the EOS counts (the policy chose it), the stop string's last token counts, nothing after either
    assert g.completion_mask.sum(1).tolist() == [len(scripts["short"]) - 30] * 2 + [stop_at] * 2
    assert g.completion_ids.shape[1] < 40  # generation ended once every row had stopped
    mask_is_prefix = g.completion_mask.cummin(dim=1).values == g.completion_mask
    assert bool(mask_is_prefix.all()) and g.completion_mask.dtype == torch.long


def test_generate_tokens_sampling_shapes_and_hf_generator(tokenizer):
    model = tiny_llama(tokenizer)
    prompts = [rr.build_prompt("q", ["a", "b"]), rr.build_prompt("q2", ["c"])]
    g = backend.generate_tokens(model, tokenizer, prompts, max_new_tokens=5, do_sample=True, temperature=0.7,
                           num_return_sequences=3)  # fmt: skip
    assert g.completion_ids.shape == (6, 5) and len(g.texts) == 6
    gen = backend.HFGenerator(model, tokenizer, max_new_tokens=4, batch_size=1)
    texts = gen(prompts)
    assert len(texts) == 2 and gen.generated_tokens <= 8 and gen.prompt_tokens > 0
    assert texts == backend.HFGenerator(model, tokenizer, max_new_tokens=4, batch_size=2)(prompts)  # greedy, batched


def test_prompt_longer_than_the_context_is_a_clear_error(tokenizer):
    model = tiny_llama(tokenizer, max_position_embeddings=300)
    too_long = rr.build_prompt("q", ["word " * 80] * 20)  # 20 passages of 400 characters: far over 300 tokens
    with pytest.raises(backend.ModelError, match="smaller --window"):
        backend.generate_tokens(model, tokenizer, [too_long], max_new_tokens=8)
    fits = rr.build_prompt("q", ["a"])
    P = len(tokenizer.apply_chat_template(fits, add_generation_prompt=True))
    g = backend.generate_tokens(model, tokenizer, [fits], max_new_tokens=10_000)  # capped to what the context leaves
    assert g.completion_ids.shape[1] <= 300 - P


def test_checkpoint_generation_defaults_do_not_leak_into_decoding(tokenizer):
    # Qwen2.5's generation_config.json sets repetition_penalty 1.05, top_k 20, ...: decoding must ignore them
    repeat = tokenizer(" ha", add_special_tokens=False).input_ids * 4 + [tokenizer.eos_token_id]
    model = scripted_llama(tokenizer, {"short": repeat, "long": repeat})
    model.generation_config.update(repetition_penalty=5.0, no_repeat_ngram_size=1, temperature=0.1, top_k=1)
    prompt = rr.build_prompt("q", ["a"])
    for sample in (False, True):
        g = backend.generate_tokens(model, tokenizer, [prompt], max_new_tokens=8, do_sample=sample)
        assert g.completion_ids[0, : len(repeat)].tolist() == repeat and g.texts == [" ha ha ha ha"]


def test_keep_freed_memory_is_accepted_by_glibc():
    import platform

    assert backend.keep_freed_memory() is (platform.libc_ver()[0] == "glibc")  # elsewhere a no-op that says so
