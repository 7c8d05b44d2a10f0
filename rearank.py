"""REARANK listwise reranking: prompts, answer parsing, sliding windows, and HF `generate`. (Built in issue 3.)"""
