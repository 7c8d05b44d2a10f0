"""The checks grpo.py makes across its flags once argparse has read each alone: `config_problem(cfg)` says what is
wrong with a grpo.Config (taken as it is, never imported), or "" when nothing is."""

from data import DATASETS, TEST_SETS, DataError
from support.files import check_file, read_qids
from support.model_shape import parse_targets


def config_problem(cfg) -> str:
    """What is wrong with a parsed Config across flags (argparse checked each one alone), or "" when nothing is."""
    if cfg.group_size < 2:
        return f"--group-size {cfg.group_size}: GRPO compares completions within a group; it needs at least 2"
    if cfg.size < 2:
        return f"--size {cfg.size}: a candidate set needs at least 2 passages to have an order"
    if cfg.min_ndcg > 1:
        return f"--min-ndcg {cfg.min_ndcg}: nDCG@10 is at most 1, so every set would be dropped"
    if cfg.clip_eps >= 1:
        return f"--clip-eps {cfg.clip_eps}: the clip range [1-eps, 1+eps] needs eps < 1"
    if cfg.method != "listwise" and (cfg.prompt, cfg.rank_reward, cfg.list_format, cfg.answer_start) != (
            "rearank", "normalised", False, ""):
        return ("--prompt, --answer-start, --rank-reward and --list-format are listwise settings; setwise has "
                "Rank-R1's prompt and reward")
    if cfg.resume and cfg.overwrite:
        return "--resume continues the run in --out, --overwrite deletes it: choose one"
    if cfg.train_file:
        try:
            check_file(cfg.train_file)
        except DataError as e:
            return f"--train-file {e}"
    elif cfg.dataset not in DATASETS:
        return f"--dataset {cfg.dataset!r}: choose one of {', '.join(DATASETS)}"
    elif cfg.dataset in TEST_SETS:
        return (f"--dataset {cfg.dataset} is a test set: training on it makes its evaluation meaningless; use dl21 or "
                "scifact-train (or a --train-file from `python -m support.augment --allow-test-set`)")
    if cfg.eval_qids:
        try:
            read_qids(cfg.eval_qids)
        except DataError as e:
            return f"--eval-qids {e}"
    if cfg.eval_every and cfg.eval_dataset not in DATASETS:
        return f"--eval-dataset {cfg.eval_dataset!r}: choose one of {', '.join(DATASETS)}"
    if cfg.eval_every and not cfg.train_file and cfg.eval_dataset == cfg.dataset:
        return f"--eval-dataset {cfg.eval_dataset} is also the training --dataset: held-out means not trained on"
    return lora_problem(cfg)


def lora_problem(cfg) -> str:
    """What is wrong with the LoRA flags given together with the others, or ""."""
    if not cfg.lora_rank:
        if (cfg.lora_alpha, cfg.lora_targets) != (type(cfg).lora_alpha, type(cfg).lora_targets):
            return "--lora-alpha and --lora-targets shape LoRA adapters: they need --lora-rank > 0"
        return ""
    if not parse_targets(cfg.lora_targets):
        return "--lora-targets: name at least one linear module, e.g. q_proj,v_proj"
    if cfg.reference != "auto":
        return (f"--reference {cfg.reference}: with --lora-rank the KL's reference is the base with the adapters "
                "switched off, the same weights as the policy's: there is no copy to place; drop --reference")
    if cfg.bf16_weights:
        return ("--bf16-weights trains every weight in bf16; with --lora-rank the base is frozen (bf16 on CUDA "
                "already) and the adapters stay fp32: drop --bf16-weights")
    return ""
