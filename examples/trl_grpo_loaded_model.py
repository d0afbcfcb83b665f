"""A model and tokenizer loaded by hand, an extra dataset column, a KL penalty and a held-out set.

    python examples/trl_grpo_loaded_model.py

Rewards see every dataset column as a list (`answer`, `digits` here) and, like TRL's, may read
`trainer_state` to change with training progress. GRPO_MAX_STEPS / GRPO_OUTPUT_DIR as in the others.
"""

import os
import random
from pathlib import Path

from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer

import gspo
from gspo.trl import GRPOConfig, GRPOTrainer

path = Path(gspo.__file__).parent / "assets" / "tiny-arith"
model = AutoModelForCausalLM.from_pretrained(path)
tokenizer = AutoTokenizer.from_pretrained(path)


def rows(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        out.append({"prompt": f"{a}+{b}=", "answer": str(a + b), "digits": len(str(a + b))})
    return Dataset.from_list(out)  # gspo.trl also takes the list itself; TRL needs a Dataset


def exact(prompts, completions, answer, **kwargs):
    return [float(c.split("<eos>")[0].strip() == a) for c, a in zip(completions, answer)]


def length_match(prompts, completions, digits, trainer_state=None, **kwargs):
    """A shaping reward for the right number of digits, faded out over the first half of training."""
    fade = 1.0
    if trainer_state is not None and trainer_state.max_steps:
        fade = max(0.0, 1.0 - 2 * trainer_state.global_step / trainer_state.max_steps)
    return [fade * float(len(c.split("<eos>")[0].strip()) == d) for c, d in zip(completions, digits)]


args = GRPOConfig(
    output_dir=os.environ.get("GRPO_OUTPUT_DIR", "grpo-loaded-model"),
    num_generations=4, per_device_train_batch_size=16, max_completion_length=6,
    learning_rate=5e-5, max_steps=int(os.environ.get("GRPO_MAX_STEPS", 40)), beta=0.01,
    eval_strategy="steps", eval_steps=10, bf16=False, gradient_checkpointing=False,
    logging_steps=5, save_strategy="no", report_to="none",
)
trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=[exact, length_match], args=args,
                      train_dataset=rows(500, seed=0), eval_dataset=rows(32, seed=1))
result = trainer.train()
print(f"{result.global_step} optimizer steps; held-out: {trainer.evaluate()}")
trainer.save_model()
