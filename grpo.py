"""A hand-written GRPO loop for reasoning rerankers. (Built in issue 4.)"""
