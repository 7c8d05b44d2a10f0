"""What a first reading of the method may skip: files, command lines, the Hugging Face backend, the prompt-once
machinery, the memory plan, checkpoints, several processes, traces and the report. Never imports grpo.py or eval.py."""
